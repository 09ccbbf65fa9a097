//! One optimizer step's micro-batches: the epoch's batches of visits, each visit's random draws
//! (mirroring, latent sample, timestep, noise, caption dropout and caption rewrite), the
//! conditioning of a batch's captions, and a batch's forward and backward.

use super::captions::rewrite_caption;
use super::config::TrainConfig;
use super::data::{epoch_batches, Dataset, Role};
use super::examples::{live_visit, Example, ExampleText, Reading};
use super::optim::GradAccumulator;
use super::prefetch::{self, Loaded};
use super::step::{training_loss, Conditioning, Losses, StepNoise};
use super::text::{tokenized, TextEncoders};
use super::trainer::Trainer;
use crate::models::clip::tokenizer::ClipTokenizer;
use crate::sample::model_files::ModelFiles;
use crate::sample::TrainSchedule;
use crate::tensor::Rng;
use crate::{DType, Error, Result, Tensor};

impl Trainer {
    /// The next batch's example indices, starting a new epoch when this one is done.
    pub(super) fn next_batch(&mut self) -> Vec<usize> {
        if self.state.pos >= self.state.order.len() {
            self.state.epoch += 1;
            self.state.pos = 0;
            self.state.order = new_epoch(&self.examples, &mut self.state.rng);
        }
        let batch = self.state.order[self.state.pos].clone();
        self.state.pos += 1;
        batch
    }

    /// A caption's context (1, 77, Dc) and pooled embedding (1, P): cached, or from the training
    /// text encoders (on the tape).
    pub(super) fn conditioning(&self, text: &ExampleText) -> Result<(Tensor, Tensor)> {
        match (text, &self.text_encoders) {
            (ExampleText::Cached { context, pooled }, _) => Ok((context.clone(), pooled.clone())),
            (
                ExampleText::Tokens {
                    ids_1,
                    ids_2,
                    weights,
                },
                Some(te),
            ) => te.encode(ids_1, ids_2, weights.as_ref()),
            (ExampleText::Tokens { .. }, None) => Err(Error::msg(
                "an example holds token ids but the run has no text encoders",
            )),
            (ExampleText::Caption(c), _) => self.encode_captions(&[c.as_str()]),
        }
    }

    /// Captions (`--shuffle-caption`) tokenized and encoded together: context (B, 77, Dc) and
    /// pooled (B, P), through the training text encoders (on the tape) or the frozen ones.
    fn encode_captions(&self, captions: &[&str]) -> Result<(Tensor, Tensor)> {
        let enc = self.captions.as_ref().ok_or_else(|| {
            Error::msg("an example holds a caption but the run does not shuffle captions")
        })?;
        let n = self.cfg.caption_chunks();
        let (ids_1, ids_2, weights) = tokenized(
            &enc.tok1,
            &enc.tok2,
            captions,
            n,
            self.cfg.weighted_captions,
            self.cfg.device,
        )?; // (B, 77 n) each
        let w = weights.as_ref();
        match (&self.text_encoders, &enc.frozen) {
            (Some(te), _) => te.encode(&ids_1, &ids_2, w),
            (None, Some(te)) => crate::autograd::no_grad(|| te.encode(&ids_1, &ids_2, w)),
            (None, None) => Err(Error::msg("--shuffle-caption without text encoders")),
        }
    }

    /// The conditioning of a batch's captions: context (B, 77, Dc) and pooled (B, P). Token
    /// ids go through the training text encoders together.
    fn batch_conditioning(&self, texts: &[&ExampleText]) -> Result<(Tensor, Tensor)> {
        if let [text] = texts {
            return self.conditioning(text);
        }
        let mut ids = (Vec::new(), Vec::new());
        let mut weights = (Vec::new(), Vec::new());
        let mut embeds = (Vec::new(), Vec::new());
        let mut captions = Vec::new();
        for text in texts {
            match text {
                ExampleText::Caption(c) => captions.push(c.as_str()),
                ExampleText::Tokens {
                    ids_1,
                    ids_2,
                    weights: w,
                } => {
                    ids.0.push(ids_1.clone());
                    ids.1.push(ids_2.clone());
                    if let Some((w1, w2)) = w {
                        weights.0.push(w1.clone());
                        weights.1.push(w2.clone());
                    }
                }
                cached => {
                    let (context, pooled) = self.conditioning(cached)?;
                    embeds.0.push(context);
                    embeds.1.push(pooled);
                }
            }
        }
        let kinds = [
            !ids.0.is_empty(),
            !embeds.0.is_empty(),
            !captions.is_empty(),
        ];
        if kinds.iter().filter(|&&k| k).count() > 1 {
            return Err(Error::msg(
                "a batch mixes cached captions, token ids and captions: every caption of a run is \
                 held one way",
            ));
        }
        if !captions.is_empty() {
            return self.encode_captions(&captions);
        }
        if !ids.0.is_empty() {
            let weights = match weights.0.len() {
                0 => None,
                k if k == ids.0.len() => {
                    Some((Tensor::cat(&weights.0, 0)?, Tensor::cat(&weights.1, 0)?))
                }
                _ => return Err(Error::msg("a batch mixes weighted and unweighted captions")),
            };
            return self.conditioning(&ExampleText::Tokens {
                ids_1: Tensor::cat(&ids.0, 0)?, // (B, 77)
                ids_2: Tensor::cat(&ids.1, 0)?,
                weights,
            });
        }
        Ok((Tensor::cat(&embeds.0, 0)?, Tensor::cat(&embeds.1, 0)?))
    }

    /// Forward and backward of one micro-batch: examples `batch` (one latent size, one role),
    /// read with captions `texts`, clean latents `x0` (B, 4, h, w), noise and timesteps `t`;
    /// its gradients are added to `acc`.
    pub(super) fn micro_batch(
        &self,
        batch: &[&Example],
        texts: &[&ExampleText],
        (x0, noise, t): (&Tensor, StepNoise<'_>, &[usize]),
        schedule: &TrainSchedule,
        params: &[(String, Tensor)],
        acc: &mut GradAccumulator,
    ) -> Result<Losses> {
        let role = batch
            .first()
            .ok_or_else(|| Error::msg("an empty micro-batch"))?
            .role;
        if batch.iter().any(|ex| ex.role != role) {
            return Err(Error::msg(
                "a micro-batch mixes training and regularization pictures",
            ));
        }
        let (context, pooled) = self.batch_conditioning(texts)?;
        let time_ids = stack(batch.iter().map(|ex| ex.time_ids.clone()).collect())?; // (B, 6)
        let masks: Option<Vec<Tensor>> = batch.iter().map(|ex| ex.mask.clone()).collect();
        let mask = masks.map(stack).transpose()?; // (B, 1, h, w)
        let cond = Conditioning {
            context: &context,
            pooled: &pooled,
            time_ids: &time_ids,
            loss_mask: mask.as_ref(),
        };
        let cultural = match role {
            Role::Prior => None,
            _ => self.cultural.as_ref().map(|c| (c, self.cfg.lambda)),
        };
        let mut losses = training_loss(&self.unet, cultural, schedule, x0, noise, t, &cond)?;
        if role == Role::Prior {
            losses.total = losses.total.scale(self.cfg.prior_loss_weight)?;
        }
        let grads = losses.total.backward()?;
        acc.add(params, &grads)?;
        Ok(losses)
    }

    /// The timesteps drawn, `[lo, hi)`: `--min-timestep` / `--max-timestep` within the schedule.
    pub(super) fn timestep_range(&self, schedule: &TrainSchedule) -> (usize, usize) {
        let n = schedule.len();
        (
            self.cfg.min_timestep.unwrap_or(0),
            self.cfg.max_timestep.unwrap_or(n),
        )
    }

    /// The random draws of one visit of example `i`, timesteps from `[lo, hi)`.
    /// `loaded`: example `i`'s picture as read ahead, when it is live and was asked for (see
    /// [`super::prefetch`]); a live picture not read ahead is read here.
    pub(super) fn draw_visit(
        &mut self,
        i: usize,
        (lo, hi): (usize, usize),
        loaded: Option<Result<Loaded>>,
    ) -> Result<Visit> {
        let rng = &mut self.state.rng;
        let device = self.cfg.device;
        // Draw order is part of the resume contract: with --flip-aug whether the picture is
        // mirrored, with --random-crop (a picture that can move) the window's left and top
        // edges, with --color-aug kohya's colour draws (see `live_visit`), then the latent
        // sample, timestep, noise, with --noise-offset its random strength (when asked) and the
        // per-channel offsets, with --multires-noise-iterations each level's size and noise,
        // with --ip-noise-gamma its random strength (when asked) and the perturbation.
        let rules = self.examples[i].rules.clone();
        let mirrored = rules.flip_aug && rng.uniform() < 0.5;
        let cropped = match (&self.examples[i].live, &self.live_vae) {
            (Some(live), Some(vae)) => {
                let read = Reading::of(&self.cfg);
                let loaded = match loaded {
                    Some(l) => l?,
                    None => prefetch::load(live, &read, self.examples[i].role)?,
                };
                let ex = &self.examples[i];
                Some(live_visit(ex, live, mirrored, vae, &read, rng, loaded)?)
            }
            (Some(_), None) => {
                return Err(Error::msg(
                    "a picture cut or shifted per visit, but the run holds no VAE to encode it",
                ))
            }
            (None, _) => None,
        };
        let ex = cropped
            .as_ref()
            .unwrap_or_else(|| visited(&self.examples[i], mirrored));
        let draw = Tensor::randn(ex.mean.dims().to_vec(), rng, DType::F32, device)?;
        let z = ex.mean.add(&ex.logvar.scale(0.5)?.exp()?.mul(&draw)?)?; // (1, 4, h, w)
        let x0 = self.latent_config.scale_latents(&z)?; // (1, 4, h, w)
        let t = lo + rng.below((hi - lo) as u64) as usize;
        let mut noise = Tensor::randn(x0.dims().to_vec(), rng, DType::F32, device)?;
        if let Some(offset) = &self.cfg.noise_offset {
            noise = offset.apply(&noise, &x0, rng)?; // (1, 4, h, w)
        }
        if let Some(multires) = &self.cfg.multires {
            noise = multires.apply(&noise, rng)?; // (1, 4, h, w)
        }
        let perturbed = match self.cfg.ip_noise_gamma {
            Some(g) => {
                let g = match self.cfg.ip_noise_random_strength {
                    true => rng.uniform() * g,
                    false => g,
                };
                let xi = Tensor::randn(x0.dims().to_vec(), rng, DType::F32, device)?;
                Some(noise.add(&xi.scale(g)?)?) // (1, 4, h, w)
            }
            None => None,
        };
        // Drawn after the noise, and only with --caption-dropout, so runs without it keep
        // their draws; then, with --shuffle-caption, the tag order of a caption that stays.
        // --caption-dropout-every-n-epochs drops every caption of every Nth epoch (kohya counts
        // epochs from 1), the draw made all the same, as kohya makes it.
        let drawn = match (&self.empty_text, rules.caption_dropout) {
            (Some(_), Some(p)) => rng.uniform() < p,
            _ => false,
        };
        let every = rules
            .caption_dropout_every_epochs
            .is_some_and(|n| (self.state.epoch + 1) % n == 0);
        let dropped = drawn || every;
        let caption = match &ex.text {
            ExampleText::Caption(c) if !dropped => Some(rewrite_caption(
                c,
                &rules.tag_rules(self.cfg.token_warmup),
                self.state.step,
                rng,
            )),
            _ => None,
        };
        // Last, and only with a LoRA dropout: the seed of the visit's dropout masks.
        let dropout_seed = match self.cfg.lora_dropout.is_off() {
            true => 0,
            false => rng.next_u64(),
        };
        Ok(Visit {
            example: cropped,
            x0,
            t,
            noise,
            perturbed,
            dropped,
            mirrored,
            caption,
            dropout_seed,
        })
    }
}

/// What one visit of an example drew: its clean latents x0 (1, 4, h, w), timestep, noise, the
/// perturbed noise (with --ip-noise-gamma) and whether its caption dropped out.
pub(super) struct Visit {
    /// With --random-crop or --color-aug, the example as this visit cut and shifted it (its
    /// latents, time ids and mask); None: the cached example (or its mirror) as it is.
    pub(super) example: Option<Example>,
    pub(super) x0: Tensor,
    pub(super) t: usize,
    pub(super) noise: Tensor,
    pub(super) perturbed: Option<Tensor>,
    pub(super) dropped: bool,
    /// Whether it trained on the mirrored picture (`--flip-aug`).
    pub(super) mirrored: bool,
    /// Its caption with the tags reordered (`--shuffle-caption`).
    pub(super) caption: Option<String>,
    /// Seeds its LoRA dropout masks (with `--network-dropout`, `--rank-dropout`,
    /// `--module-dropout`).
    pub(super) dropout_seed: u64,
}

/// The tokenizers and (when the text encoders do not train) the frozen encoders that turn
/// shuffled captions into conditioning every step.
pub(super) struct CaptionEncoder {
    pub(super) tok1: ClipTokenizer,
    pub(super) tok2: ClipTokenizer,
    pub(super) frozen: Option<TextEncoders>,
}

impl CaptionEncoder {
    /// The encoder of a run whose captions are rewritten per visit (None otherwise): the
    /// model's tokenizers, plus frozen text encoders in the run's dtype unless the text encoders
    /// train (`encoders_train`), as kohya's.
    pub(super) fn load(
        cfg: &TrainConfig,
        files: &ModelFiles,
        encoders_train: bool,
        log: &mut dyn FnMut(&str),
    ) -> Result<Option<CaptionEncoder>> {
        match cfg.live_captions() {
            true => {
                let (tok1, tok2) = files.tokenizers()?;
                let tok1 = tok1.ok_or_else(|| {
                    Error::Config("captions rewritten per visit: the model has no tokenizer".into())
                })?;
                // Frozen encoders in the run's dtype (kohya's); they never see a gradient.
                let frozen = match encoders_train {
                    true => None,
                    false => {
                        let (te1, te2) = files.text_encoders(&[], cfg.dtype, cfg.device)?;
                        let te1 = te1.ok_or_else(|| {
                            Error::Config(
                                "captions rewritten per visit: the model has no text_encoder"
                                    .into(),
                            )
                        })?;
                        Some(TextEncoders { te1, te2 })
                    }
                };
                let mut what = Vec::new();
                if cfg.dataset_config.is_some() {
                    what.push("rewritten by their subsets' rules".to_string());
                }
                if cfg.dataset_config.is_none() && cfg.shuffle_caption {
                    what.push("shuffled".to_string());
                }
                if let Some(p) = cfg.caption_tag_dropout.filter(|_| what.is_empty()) {
                    what.push(format!("each dropped with probability {p}"));
                }
                log(&format!(
                    "captions: comma-separated tags {} per visit{}; the text encoders stay loaded \
                     and encode every step",
                    what.join(" and "),
                    match (cfg.keep_tokens, &cfg.dataset_config) {
                        (0, _) | (_, Some(_)) => String::new(),
                        (k, None) => format!(", the first {k} kept in place"),
                    }
                ));
                Ok(Some(CaptionEncoder { tok1, tok2, frozen }))
            }
            false => Ok(None),
        }
    }
}

/// The example a visit trains on: `ex`, or its mirrored picture.
pub(super) fn visited(ex: &Example, mirrored: bool) -> &Example {
    match (&ex.mirror, mirrored) {
        (Some(m), true) => m,
        _ => ex,
    }
}

/// What a batch must share: the latent size (the bucket), the role (the loss it trains on) and
/// the dataset (its batch size).
pub(super) fn batch_key(ex: &Example) -> (Vec<usize>, Role, usize) {
    (ex.mean.dims().to_vec(), ex.role, ex.group)
}

/// A new epoch's batches: the training visits (each example `repeats` times) shuffled, then
/// batched by bucket, role and dataset, at the dataset's batch size.
pub(super) fn new_epoch(examples: &[Example], rng: &mut Rng) -> Vec<Vec<usize>> {
    let repeats: Vec<usize> = examples.iter().map(|e| e.repeats).collect();
    let mut order = Dataset::epoch_order(&repeats);
    rng.shuffle(&mut order);
    epoch_batches(
        &order,
        |i| batch_key(&examples[i]),
        |i| examples[i].batch_size,
        rng,
    )
}

/// Per-example tensors stacked along the batch dimension; one tensor is passed through as is.
pub(super) fn stack(mut parts: Vec<Tensor>) -> Result<Tensor> {
    match parts.len() {
        1 => Ok(parts.remove(0)),
        _ => Tensor::cat(&parts, 0),
    }
}
