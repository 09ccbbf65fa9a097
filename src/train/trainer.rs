//! The training loop: caches latents and text embeddings, attaches adapters for the chosen
//! method, and runs uniform-timestep epsilon training with gradient accumulation, AdamW, periodic
//! checkpoints and samples, a CSV log and a loss plot. Resuming from a checkpoint continues the
//! same stream of random draws, so a resumed run equals an uninterrupted one bit for bit.

use super::adamw8bit::Place;
use super::batch::{batch_key, stack, visited, CaptionEncoder};
use super::checkpoint::{save_checkpoint, TrainState};
use super::config::Algo;
pub use super::config::TrainConfig;
use super::cultural::CulturalLoss;
use super::data::{batches_per_epoch, Dataset, Role};
use super::examples::{
    load_dataset, prepare_examples, Example, ExampleText, LivePicture, Prepared, Reading,
};
use super::lr_groups::{slot_rates, SlotRate};
use super::max_norm::{regularize, slot_factors, weight_norms, MaxNormReport};
use super::memory::{human, policy_name, AUTO_POLICIES};
use super::optim::{GradAccumulator, Optimizer, Rule, Slot};
use super::plan::UnetPlan;
use super::prefetch::Prefetcher;
use super::start::{check_planned_blocks, fresh, resume, Start};
use super::step::StepNoise;
use super::text::TextEncoders;
use crate::formats::adapter::Adapter;
use crate::models::unet::UNet2DConditionModel;
use crate::nn::lora::{Adaptable, LoraAdapter};
use crate::nn::lora_dropout::DropoutDraw;
use crate::sample::model_files::ModelFiles;
use crate::sample::pipeline::unet_module_index;
use crate::sample::TrainSchedule;
use crate::{DType, Error, Result, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What happened in one optimizer step.
#[derive(Clone, Debug)]
pub struct StepLog {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub diffusion: f64,
    pub cultural: Option<f64>,
    pub lr: f64,
    /// The global L2 norm of the step's mean gradient, before any clipping.
    pub grad_norm: f64,
    /// With `--scale-weight-norms`: what the max-norm regularization did after the step.
    pub weight_norms: Option<MaxNormReport>,
    /// The validation loss after this step, when one was due.
    pub val: Option<f64>,
    /// With Prodigy: its step-size estimate d after the step (the step moved by about d * lr).
    pub prodigy_d: Option<f64>,
}

/// Paths of everything a run writes next to `out`.
pub struct Outputs {
    pub adapter: PathBuf,
    pub log_csv: PathBuf,
    pub plot: PathBuf,
    pub samples: PathBuf,
    /// `step,val_loss` rows (with `--val-data`).
    pub val_csv: PathBuf,
}

impl Outputs {
    pub fn for_adapter(out: &Path) -> Outputs {
        let stem = out
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "adapter".into());
        let dir = out.parent().map(Path::to_path_buf).unwrap_or_default();
        Outputs {
            adapter: out.to_path_buf(),
            log_csv: dir.join(format!("{stem}.loss.csv")),
            plot: dir.join(format!("{stem}.loss.png")),
            samples: dir.join(format!("{stem}.samples")),
            val_csv: dir.join(format!("{stem}.val.csv")),
        }
    }

    pub fn checkpoint(&self, step: u64) -> PathBuf {
        let stem = self
            .adapter
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.adapter
            .with_file_name(format!("{stem}.step{step:06}.ckpt.safetensors"))
    }

    /// The step of a file name [`Outputs::checkpoint`] writes for this adapter, if it is one.
    pub fn checkpoint_step(&self, file_name: &str) -> Option<u64> {
        let stem = self.adapter.file_stem()?.to_string_lossy();
        let digits = file_name
            .strip_prefix(&format!("{stem}.step"))?
            .strip_suffix(".ckpt.safetensors")?;
        match !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            true => digits.parse().ok(),
            false => None,
        }
    }
}

/// A run's live objects.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub unet: UNet2DConditionModel,
    pub cultural: Option<CulturalLoss>,
    pub concept_embeds: Option<Tensor>,
    /// Present when the run trains the text encoders.
    pub text_encoders: Option<TextEncoders>,
    pub optimizer: Optimizer,
    pub state: TrainState,
    pub outputs: Outputs,
    pub(super) examples: Vec<Example>,
    /// `--val-data`'s pictures, scored by `validation_loss`.
    pub(super) val_examples: Vec<Example>,
    val_every: u64,
    /// Each preview prompt's cached text (and its negative's), when the text encoders are
    /// frozen; empty when they train.
    pub(super) sample_embeds: Vec<(ExampleText, Option<ExampleText>)>,
    /// The empty caption as the step reads it, with `--caption-dropout`.
    pub(super) empty_text: Option<ExampleText>,
    /// With `--shuffle-caption`: the tokenizers, and the frozen text encoders when they do not
    /// train, which encode every step's captions.
    pub(super) captions: Option<CaptionEncoder>,
    pub(super) files: ModelFiles,
    /// With --random-crop (a picture that can move) or --color-aug: the VAE that encodes each
    /// visit's picture.
    pub(super) live_vae: Option<crate::models::vae::AutoencoderKL>,
    /// Reads those pictures ahead of their visits, on a thread of its own.
    prefetch: Option<Prefetcher>,
    /// Visits of live pictures so far, and how many of them found their picture read ahead.
    live_reads: (u64, u64),
    /// The VAE config whose scaling (and latent statistics) turns a latent into the UNet's x0.
    pub(super) latent_config: crate::models::vae::VaeConfig,
    /// The noise schedule and loss target of the model (its scheduler config).
    pub(super) schedule: TrainSchedule,
    total_steps: u64,
    /// Each slot's part (UNet or text encoders) and its LoRA+ and block factor.
    slot_rates: Vec<SlotRate>,
}

impl Trainer {
    pub fn new(cfg: TrainConfig, log: &mut dyn FnMut(&str)) -> Result<Trainer> {
        cfg.check()?;
        if let Some(dir) = cfg.out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let files = ModelFiles::resolve(&cfg.model, cfg.config_dir.as_deref())?
            .with_vae(cfg.vae.clone())?;
        let schedule = super::objective::train_schedule(&cfg, &files, log)?;
        if !files.has_text_encoder_1()? {
            return Err(Error::Config(format!(
                "{}: the model has no text_encoder (an SDXL refiner, conditioned on \
                 text_encoder_2 alone); train on the base model, whose adapters the refiner does \
                 not load",
                cfg.model.display()
            )));
        }
        // Block settings checked against the model's layout before any cache is built.
        let plan = UnetPlan::new(&cfg, &files.unet_config()?.layout(), log)?;
        let data = load_dataset(&cfg, log)?;
        if cfg.any_flip() {
            log("flip augmentation: each visit trains on the picture mirrored with probability 1/2 (mirrored latents cached too)");
        }
        let vae_config = files.vae_config_in_use()?;
        if vae_config.latents_mean.is_some() != vae_config.latents_std.is_some() {
            return Err(Error::Config(format!(
                "{}: the VAE config has only one of latents_mean and latents_std",
                cfg.vae.as_ref().unwrap_or(&cfg.model).display()
            )));
        }
        if vae_config.latents_mean.is_some() {
            log("latents: (z - latents_mean) * scaling_factor / latents_std (the VAE config's statistics)");
        }
        if let Some(vae) = &cfg.vae {
            log(&format!(
                "vae: {} (scaling factor {})",
                vae.display(),
                vae_config.scaling_factor
            ));
        }
        let Prepared {
            mut examples,
            samples: sample_embeds,
            empty: empty_text,
        } = prepare_examples(&cfg, &files, &data, log)?;
        // Validation pictures come last (see `load_dataset`) and never train.
        let n_train = data
            .samples
            .iter()
            .filter(|s| s.role != Role::Validation)
            .count();
        let val_examples = examples.split_off(n_train);
        let mut text_encoders = match cfg.train_text_encoder {
            true => {
                let (te1, te2) = files.text_encoders(&[], cfg.dtype, cfg.device)?;
                let te1 = te1.ok_or_else(|| {
                    Error::Config("the model has no text_encoder to train".into())
                })?;
                Some(TextEncoders { te1, te2 })
            }
            false => None,
        };
        let captions = CaptionEncoder::load(&cfg, &files, text_encoders.is_some(), log)?;
        let latent_config = vae_config.clone();
        let precision = crate::nn::weights::Precision {
            compute: cfg.dtype,
            matrices: cfg.weight_dtype,
        };
        let mut unet = files.unet(&[], precision, cfg.device)?;
        unet.checkpoint = cfg.checkpointing.unwrap_or_default();
        let index = unet_module_index(&unet);
        let repeats: Vec<usize> = examples.iter().map(|e| e.repeats).collect();
        let batches = batches_per_epoch(
            &Dataset::epoch_order(&repeats),
            |i| batch_key(&examples[i]),
            |i| examples[i].batch_size,
        );
        let steps_per_epoch = (batches as u64).div_ceil(cfg.grad_accum as u64);
        if cfg.groups().iter().any(|g| g.batch_size > 1) {
            log(&format!(
                "batches of {} (one bucket and one role each{}): {batches} an epoch",
                cfg.batch_sizes(),
                match cfg.dataset_config {
                    Some(_) => ", of one dataset",
                    None => "",
                }
            ));
        }
        let total_steps = cfg.max_steps.unwrap_or(cfg.epochs * steps_per_epoch);
        // Epoch-counted checkpoints and previews in steps: the step that ends every Nth epoch.
        let in_steps = |epochs: Option<u64>, flag: &str| match epochs {
            Some(0) => Err(Error::Config(format!("{flag} must be at least 1"))),
            Some(n) => Ok(Some(n * steps_per_epoch.max(1))),
            None => Ok(None),
        };
        let mut cfg = cfg;
        if let Some(w) = &mut cfg.token_warmup {
            *w = w.resolve(total_steps);
            log(&format!(
                "token warm-up: {} steps from {} movable tags",
                w.steps, w.min
            ));
        }
        if let Some(n) = in_steps(cfg.save_every_epochs, "--save-every-n-epochs")? {
            cfg.save_every = Some(n);
        }
        if let Some(n) = in_steps(cfg.sample_every_epochs, "--sample-every-n-epochs")? {
            cfg.sample_every = Some(n);
        }
        let val_every = match cfg.val_every {
            Some(0) => return Err(Error::Config("--val-every must be at least 1".into())),
            Some(_) if cfg.val_data.is_none() => {
                return Err(Error::Config("--val-every needs --val-data DIR".into()))
            }
            Some(n) => n,
            None => steps_per_epoch.max(1),
        };
        if !val_examples.is_empty() {
            log(&format!(
                "validation loss every {val_every} steps and after the last: {} pictures at \
                 schedule points {:?}, fixed noise",
                val_examples.len(),
                super::validation::points(schedule.len())
            ));
        }
        let linears = unet.adaptable_linears();
        if let Some(t) = cfg.targets.iter().find(|t| {
            !linears
                .iter()
                .any(|(p, _)| super::start::targeted(&[t.to_string()], p))
        }) {
            return Err(Error::Config(format!(
                "--targets {t}: no linear of the UNet's transformers ends in `.{t}` (to_q, to_k, \
                 to_v, to_out.0, ff.net.0.proj, ff.net.2, proj_in, proj_out; `all` is every one)"
            )));
        }
        drop(linears);
        let Start {
            modules: adapter_modules,
            cultural,
            concept_embeds,
            optimizer,
            state,
        } = match &cfg.resume {
            Some(path) => resume(path, &cfg, &index, data.epoch_len(), n_train, log)?,
            None => {
                use super::network_weights as nw;
                let mut s = fresh(&cfg, &unet, &plan, text_encoders.as_mut(), &examples)?;
                if let Some(w) = &cfg.network_weights {
                    let te = text_encoders.as_mut();
                    match cfg.dim_from_weights {
                        true => s.modules = nw::from_file(w, &unet, te, &cfg, log)?,
                        false => {
                            nw::load(w, &mut s.modules, &unet, te, log)?;
                        }
                    }
                }
                s
            }
        };
        if cfg.resume.is_some() && plan.per_block() {
            check_planned_blocks(&cfg, &unet, &adapter_modules, &plan)?;
        }
        if adapter_modules.is_empty() {
            return Err(Error::Config(format!(
                "no transformer linear matches the targets {:?}{}",
                cfg.targets,
                match plan.per_block() {
                    true => " in a block whose learning-rate weight and rank are above 0",
                    false => "",
                }
            )));
        }
        let mut by_path: BTreeMap<String, LoraAdapter> = adapter_modules.into_iter().collect();
        unet.attach_all(|p| Ok(by_path.remove(p)))?;
        if let Some(te) = &mut text_encoders {
            for (path, lin) in te.linears_mut() {
                if let Some(a) = by_path.remove(&path) {
                    lin.set_adapter(a)
                        .map_err(|e| Error::Config(format!("adapter module `{path}`: {e}")))?;
                }
            }
        }
        if let Some(p) = by_path.keys().next() {
            return Err(Error::Config(format!(
                "adapter module `{p}` matches no adaptable layer of this model"
            )));
        }
        let mut params = unet.adapter_parameters();
        if let Some(c) = &cultural {
            params.extend(c.parameters());
        }
        if let Some(te) = &text_encoders {
            params.extend(te.parameters());
        }
        let optimizer = match optimizer {
            Some(mut o) => {
                o.align_to(&params)?;
                o
            }
            None => cfg.optimizer.build(cfg.adamw, &params)?,
        };
        if let Some(p) = optimizer.prodigy() {
            log(&format!(
                "optimizer: {} (d {} now; Prodigy expects --lr 1, this run has {})",
                p.config.describe(),
                p.d,
                cfg.adamw.lr
            ));
        }
        if let Some(f) = optimizer.adafactor() {
            log(&f.describe_run(cfg.adamw.lr, cfg.adamw.weight_decay));
        }
        if let Rule::Lion(l) = &optimizer.rule {
            log(&format!(
                "optimizer: {} (betas {}, {}; weight decay {}; one moment, no second)",
                l.describe(),
                cfg.adamw.beta1,
                cfg.adamw.beta2,
                cfg.adamw.weight_decay
            ));
        }
        if let Some(q) = optimizer.quantized() {
            let quantized: Vec<&Slot> = optimizer
                .slots
                .iter()
                .zip(&q.places)
                .filter(|(_, p)| matches!(p, Place::Bytes { .. }))
                .map(|(s, _)| s)
                .collect();
            log(&format!(
                "optimizer: {}: {} of {} trainables ({} of {} values) with 8-bit moments",
                q.config.describe(optimizer.rule.name()),
                quantized.len(),
                optimizer.slots.len(),
                quantized.iter().map(|s| s.len).sum::<usize>(),
                optimizer.len()
            ));
        }
        log(&format!(
            "optimizer state: {} on {} (f32 masters and moments{})",
            human(optimizer.state_bytes() as u64),
            cfg.device,
            match optimizer.rule {
                Rule::AdamW8bit(_) | Rule::Lion8bit(_) => ", 8-bit where quantized",
                _ => "",
            }
        ));
        // Mixed precision: the optimizer holds the f32 values (just taken); the UNet's adapters
        // become leaves in the compute dtype, so the forward needs no per-step casts. The
        // cultural module stays f32: it reads the f32 clean-latent estimate.
        if cfg.dtype != DType::F32 {
            let mut layers = unet.adaptable_mut();
            if let Some(te) = &mut text_encoders {
                layers.extend(
                    te.linears_mut()
                        .into_iter()
                        .map(|(p, l)| (p, Adaptable::Linear(l))),
                );
            }
            for (_, mut layer) in layers {
                if let Some(a) = layer.adapter() {
                    let leaves = a.trainable_in(cfg.dtype)?;
                    *layer.adapter_mut() = Some(leaves);
                }
            }
        }
        let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
        let n_text = text_encoders.as_ref().map_or(0, |t| t.parameters().len());
        let slot_rates = slot_rates(
            &names,
            n_text,
            &cfg.loraplus,
            plan.weights.as_ref().map(|w| (w, &plan.keys)),
        );
        if let Some(r) = cfg.loraplus.unet_ratio() {
            log(&format!("LoRA+: the UNet's lora_up at {r} times its rate"));
        }
        if let (Some(r), Some(_)) = (cfg.loraplus.text_encoder_ratio(), &text_encoders) {
            log(&format!(
                "LoRA+: the text encoders' lora_up at {r} times their rate"
            ));
        }
        if let Some(te) = &text_encoders {
            log(&format!(
                "text encoders train: {} adapted linears (text_encoder's last layer feeds nothing SDXL reads), lr {}",
                te.adapters().len(),
                cfg.text_encoder_lr.unwrap_or(cfg.adamw.lr)
            ));
        }
        log(&format!(
            "method {}{} | {} adapted linears{} | {} trainable tensors ({} values, f32) | UNet in {} on {} | {} optimizer steps",
            cfg.method.name(),
            match cfg.algo {
                Algo::Loha => " (LyCORIS LoHa)",
                Algo::Lokr { .. } => " (LyCORIS LoKr)",
                Algo::Lora => "",
            },
            unet.adaptable_linears().iter().filter(|(_, l)| l.adapter.is_some()).count(),
            match cfg.conv_lora {
                Some(c) => format!(
                    " + {} conv-group layers (3x3 at {})",
                    unet.conv_group().iter().filter(|l| l.adapter.is_some()).count(),
                    match cfg.block_dims.conv_dims.is_some() {
                        true => "the ranks per block".to_string(),
                        false => format!("rank {} alpha {}", c.dim, c.alpha),
                    }
                ),
                None => String::new(),
            },
            params.len(),
            params.iter().map(|(_, t)| t.elem_count()).sum::<usize>(),
            cfg.dtype,
            cfg.device,
            total_steps
        ));
        let live: Vec<&LivePicture> = examples.iter().filter_map(|e| e.live.as_deref()).collect();
        let moving = live.iter().filter(|l| l.random_crop).count();
        let shifted = live.iter().filter(|l| l.color_aug).count();
        if cfg.all_rules().iter().any(|r| r.random_crop) {
            log(&match moving {
                0 => "random crop: no picture is larger than its bucket, so every window is the \
                      centred one"
                    .to_string(),
                n => format!(
                    "random crop: {n} of {} pictures are larger than their buckets; their windows \
                     move",
                    examples.len()
                ),
            });
        }
        if shifted > 0 {
            log(&format!(
                "colour augmentation: {shifted} of {} pictures (kohya's color_aug)",
                examples.len()
            ));
        }
        let live_vae = match live.len() {
            0 => None,
            n => {
                let mut vae = files.vae(cfg.device)?;
                vae.tiling = cfg.vae_tiling;
                log(&format!(
                    "{n} pictures are read and encoded by the VAE at every visit (the VAE stays \
                     loaded)"
                ));
                Some(vae)
            }
        };
        let prefetch = live_vae
            .as_ref()
            .map(|_| Prefetcher::new(Reading::of(&cfg)));
        let outputs = Outputs::for_adapter(&cfg.out);
        let mut trainer = Trainer {
            cfg,
            unet,
            cultural,
            concept_embeds,
            text_encoders,
            optimizer,
            state,
            outputs,
            examples,
            sample_embeds,
            empty_text,
            captions,
            val_examples,
            val_every,
            files,
            prefetch,
            live_reads: (0, 0),
            live_vae,
            latent_config,
            schedule,
            total_steps,
            slot_rates,
        };
        if let Some(budget) = trainer.cfg.memory_budget {
            let policies = match trainer.cfg.checkpointing {
                Some(p) => vec![p],
                None => AUTO_POLICIES.to_vec(),
            };
            let plan = trainer.plan_memory(budget, &policies)?;
            let probes: Vec<String> = plan
                .probes
                .iter()
                .map(|(p, peak)| {
                    let at = peak.map_or("beyond the device".into(), human);
                    format!("{at} with checkpointing {}", policy_name(*p))
                })
                .collect();
            log(&format!(
                "memory budget {} on {}: {} resident; one step peaks at {} | using checkpointing {}",
                human(plan.budget),
                trainer.cfg.device,
                human(plan.resident),
                probes.join(", "),
                policy_name(plan.chosen)
            ));
        }
        Ok(trainer)
    }

    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// Every trainable in slot order: the UNet's adapters and the cultural module (the first
    /// parameter group), then the text encoders' adapters (the second).
    pub fn params(&self) -> Vec<(String, Tensor)> {
        let mut p = self.unet.adapter_parameters();
        if let Some(c) = &self.cultural {
            p.extend(c.parameters());
        }
        if let Some(te) = &self.text_encoders {
            p.extend(te.parameters());
        }
        p
    }

    /// Every slot's learning rate for the optimizer step at schedule factor `factor`.
    fn lr_rates(&self, factor: f64) -> Vec<f64> {
        let unet_lr = self.cfg.adamw.lr * factor;
        let te_lr = self.cfg.text_encoder_lr.unwrap_or(self.cfg.adamw.lr) * factor;
        self.slot_rates
            .iter()
            .map(|r| r.factor * if r.text_encoder { te_lr } else { unet_lr })
            .collect()
    }

    /// Every adapter as (module path, adapter): the UNet's, then the text encoders'.
    fn adapters(&self) -> Vec<(String, LoraAdapter)> {
        let mut out: Vec<(String, LoraAdapter)> = self
            .unet
            .adaptable()
            .into_iter()
            .filter_map(|l| l.adapter.cloned().map(|a| (l.path, a)))
            .collect();
        if let Some(te) = &self.text_encoders {
            out.extend(te.adapters());
        }
        out
    }

    /// The adapter as it stands (what `--out` receives), always in f32: with a bf16/f16 UNet the
    /// values come from the optimizer's f32 masters, not from the rounded leaves.
    pub fn adapter(&self) -> Result<Adapter> {
        let mut modules = self.adapters();
        if self.cfg.dtype != DType::F32 {
            let slots: HashMap<&str, &Slot> = self
                .optimizer
                .slots
                .iter()
                .map(|s| (s.name.as_str(), s))
                .collect();
            for (path, a) in &mut modules {
                let mut f32 = a.frozen(DType::F32, 1.0)?;
                f32.assign(|name, dims| {
                    let key = format!("{path}.{name}");
                    let slot = slots
                        .get(key.as_str())
                        .ok_or_else(|| Error::msg(format!("optimizer has no slot `{key}`")))?;
                    let master = self.optimizer.slot_master(slot)?;
                    master.reshape(dims.to_vec())
                })?;
                *a = f32;
            }
        }
        let c = &self.cfg;
        let settings = c.settings(self.state.step);
        Ok(Adapter {
            method: c.method,
            config: c.lora,
            concepts: if self.concept_embeds.is_some() {
                c.concepts.clone()
            } else {
                vec![]
            },
            concept_embeds: self.concept_embeds.clone(),
            modules,
            cultural: self.cultural.clone(),
            settings,
        })
    }

    /// With live pictures (`--random-crop`, `--color-aug`): their visits in this process, and how
    /// many found their picture read ahead.
    pub fn live_reads(&self) -> Option<(u64, u64)> {
        self.prefetch.as_ref().map(|_| self.live_reads)
    }

    /// Asks the read-ahead thread for the live pictures of this epoch's next `2 grad_accum`
    /// batches (see [`super::prefetch`]).
    fn read_ahead(&self) {
        let Some(p) = &self.prefetch else { return };
        let s = &self.state;
        let end = (s.pos + 2 * self.cfg.grad_accum).min(s.order.len());
        for pos in s.pos..end {
            for (j, &i) in s.order[pos].iter().enumerate() {
                if let Some(live) = &self.examples[i].live {
                    p.request((s.epoch, pos, j), live.clone(), self.examples[i].role);
                }
            }
        }
    }

    /// One optimizer step: `grad_accum` micro-batches, then AdamW.
    pub fn step(&mut self) -> Result<StepLog> {
        let params = self.params();
        let mut acc = GradAccumulator::new(&self.optimizer)?;
        let schedule = self.schedule.clone();
        let (mut loss, mut diffusion, mut cultural) = (0.0, 0.0, 0.0);
        let (lo, hi) = self.timestep_range(&schedule);
        for _ in 0..self.cfg.grad_accum {
            let batch = self.next_batch();
            self.read_ahead();
            let (epoch, pos) = (self.state.epoch, self.state.pos - 1);
            // Each visit draws as a batch of one would, in batch order, so a batch of B computes
            // what B accumulated micro-batches of the same visits compute.
            let mut visits = Vec::with_capacity(batch.len());
            for (j, &i) in batch.iter().enumerate() {
                let loaded = self.prefetch.as_ref().and_then(|p| p.take((epoch, pos, j)));
                if self.examples[i].live.is_some() {
                    self.live_reads.0 += 1;
                    self.live_reads.1 += loaded.is_some() as u64;
                }
                visits.push(self.draw_visit(i, (lo, hi), loaded)?);
            }
            let dropout = !self.cfg.lora_dropout.is_off();
            if dropout {
                let seeds: Vec<u64> = visits.iter().map(|v| v.dropout_seed).collect();
                self.set_dropout(Some(&seeds))?;
            }
            let x0 = stack(visits.iter().map(|v| v.x0.clone()).collect())?; // (B, 4, h, w)
            let noise = stack(visits.iter().map(|v| v.noise.clone()).collect())?;
            let input = match self.cfg.ip_noise_gamma {
                Some(_) => Some(stack(
                    visits.iter().filter_map(|v| v.perturbed.clone()).collect(),
                )?),
                None => None,
            };
            let t: Vec<usize> = visits.iter().map(|v| v.t).collect();
            let examples: Vec<&Example> = batch
                .iter()
                .zip(&visits)
                .map(|(&i, v)| {
                    v.example
                        .as_ref()
                        .unwrap_or_else(|| visited(&self.examples[i], v.mirrored))
                })
                .collect();
            let owned: Vec<ExampleText> = examples
                .iter()
                .zip(&visits)
                .map(|(ex, v)| match (&self.empty_text, v.dropped, &v.caption) {
                    (Some(empty), true, _) => empty.clone(),
                    (_, _, Some(c)) => ExampleText::Caption(c.clone()),
                    _ => ex.text.clone(),
                })
                .collect();
            let texts: Vec<&ExampleText> = owned.iter().collect();
            let noise = StepNoise {
                input: input.as_ref().unwrap_or(&noise),
                target: &noise,
            };
            let losses = self.micro_batch(
                &examples,
                &texts,
                (&x0, noise, &t),
                &schedule,
                &params,
                &mut acc,
            );
            if dropout {
                self.set_dropout(None)?;
            }
            let losses = losses?;
            loss += losses.total.to_scalar()?;
            diffusion += losses.diffusion.to_scalar()?;
            if let Some(c) = &losses.cultural {
                cultural += c.to_scalar()?;
            }
        }
        let n = self.cfg.grad_accum as f64;
        let factor =
            self.cfg
                .schedule
                .factor(self.state.step + 1, self.total_steps, self.cfg.adamw.lr);
        // Adafactor's relative step is the rate (before each trainable's RMS scale), not --lr.
        let lr = match self.optimizer.adafactor() {
            Some(f) if f.config.relative_step => f.config.relative_rate(self.optimizer.step + 1),
            _ => self.cfg.adamw.lr * factor,
        };
        let rates = self.lr_rates(factor);
        // Checked before the step, so a bad step never reaches the adapter's values.
        let clipped = acc.clipped(self.cfg.max_grad_norm)?;
        let grad_norm = clipped.norm;
        let bad = [
            (loss, "loss"),
            (diffusion, "loss"),
            (grad_norm, "gradient norm"),
        ]
        .into_iter()
        .find(|(v, _)| !v.is_finite());
        if let Some((v, what)) = bad {
            return Err(Error::msg(format!(
                "{what} became {v} at step {}: lower --lr or check the data",
                self.state.step + 1
            )));
        }
        self.optimizer
            .step_rates(&params, &acc.sum, clipped.scale, &rates)?;
        let weight_norms = match self.cfg.scale_weight_norms {
            Some(max) => Some(self.scale_weight_norms(&params, max)?),
            None => None,
        };
        self.state.step += 1;
        Ok(StepLog {
            step: self.state.step,
            epoch: self.state.epoch,
            loss: loss / n,
            diffusion: diffusion / n,
            cultural: self.cultural.as_ref().map(|_| cultural / n),
            lr,
            grad_norm,
            weight_norms,
            val: None,
            prodigy_d: self.optimizer.prodigy().map(|p| p.d),
        })
    }

    /// kohya's max-norm regularization after a step (see [`super::max_norm`]): every adapter's
    /// `||(alpha / r) B A||` from the optimizer's masters (`params` in slot order), and A and B
    /// of each one above `max` scaled back onto it.
    fn scale_weight_norms(
        &mut self,
        params: &[(String, Tensor)],
        max: f64,
    ) -> Result<MaxNormReport> {
        let adapters = self.adapters();
        let slot_of: HashMap<&str, usize> = params
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.as_str(), i))
            .collect();
        let mut pairs = Vec::with_capacity(adapters.len());
        let mut slots = Vec::with_capacity(adapters.len());
        for (path, adapter) in &adapters {
            let master = |name: &str| -> Result<(usize, Tensor)> {
                let key = format!("{path}.{name}");
                let &i = slot_of
                    .get(key.as_str())
                    .ok_or_else(|| Error::msg(format!("optimizer has no slot `{key}`")))?;
                let values = self.optimizer.slot_master(&self.optimizer.slots[i])?;
                Ok((i, values.reshape(params[i].1.dims().to_vec())?))
            };
            let (ia, a) = master("lora_A")?;
            let (ib, b) = master("lora_B")?;
            let c = adapter.config;
            pairs.push((a, b, c.alpha / c.rank as f64));
            slots.push((ia, ib));
        }
        let norms = weight_norms(&pairs)?;
        let (ratios, report) = regularize(&norms, max);
        let factors = slot_factors(&slots, &ratios);
        if !factors.is_empty() {
            self.optimizer.scale_slots(params, &factors)?;
        }
        Ok(report)
    }

    /// Sets every adapter's LoRA dropout draw for visits that drew `seeds` (the UNet's adapters
    /// then the text encoders', numbered in that order), or clears them (None) so validation and
    /// previews run without dropout.
    pub(super) fn set_dropout(&mut self, seeds: Option<&[u64]>) -> Result<()> {
        let config = self.cfg.lora_dropout;
        // On a GPU the network-dropout masks are made there from the visit seeds: B values,
        // uploaded once for every adapter of the micro-batch.
        let device_seeds = match (seeds, self.cfg.device, config.dropout) {
            (Some(s), crate::Device::Cuda(_), Some(_)) => {
                let ids: Vec<i64> = s.iter().map(|&v| v as i64).collect();
                Some(Tensor::from_vec(ids, s.len(), self.cfg.device)?)
            }
            _ => None,
        };
        let mut layers = self.unet.adaptable_mut();
        if let Some(te) = &mut self.text_encoders {
            layers.extend(
                te.linears_mut()
                    .into_iter()
                    .map(|(p, l)| (p, Adaptable::Linear(l))),
            );
        }
        let mut m = 0;
        for (_, mut layer) in layers {
            if let Some(a) = layer.adapter_mut() {
                a.dropout = seeds.map(|s| {
                    DropoutDraw::for_module(config, s, m).with_device_seeds(device_seeds.clone())
                });
                m += 1;
            }
        }
        Ok(())
    }

    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let path = self.outputs.checkpoint(self.state.step);
        save_checkpoint(
            &path,
            &self.adapter()?,
            &unet_module_index(&self.unet),
            &self.optimizer,
            &self.state,
        )?;
        if let Some(keep) = self.cfg.keep_checkpoints {
            self.prune_checkpoints(keep)?;
        }
        Ok(path)
    }

    /// Removes this run's checkpoints older than its newest `keep` up to the current step;
    /// checkpoints of later steps (a longer earlier run's) are left alone.
    fn prune_checkpoints(&self, keep: usize) -> Result<()> {
        let adapter = &self.outputs.adapter;
        let dir = match adapter.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut steps: Vec<u64> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                self.outputs
                    .checkpoint_step(&e.file_name().to_string_lossy())
            })
            .filter(|&s| s <= self.state.step)
            .collect();
        steps.sort_unstable();
        for &step in &steps[..steps.len().saturating_sub(keep)] {
            let path = self.outputs.checkpoint(step);
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    /// Writes the adapter to `--out` in `--save-precision`.
    pub fn save_adapter(&self) -> Result<()> {
        self.adapter()?.save_in(
            &self.outputs.adapter,
            &unet_module_index(&self.unet),
            self.cfg.save_precision,
        )
    }

    /// Run to the end, calling `on_step` after every optimizer step; writes the CSV log (appending
    /// when resuming), checkpoints, samples, the adapter and the loss plot.
    pub fn run(&mut self, mut on_step: impl FnMut(&StepLog)) -> Result<()> {
        let csv_exists = self.outputs.log_csv.exists();
        let mut csv = std::fs::OpenOptions::new()
            .create(true)
            .append(self.cfg.resume.is_some())
            .write(true)
            .truncate(self.cfg.resume.is_none())
            .open(&self.outputs.log_csv)
            .map_err(|e| Error::io(&self.outputs.log_csv, e))?;
        // With --scale-weight-norms, three more columns: what the regularization did.
        let norms_header = match self.cfg.scale_weight_norms {
            Some(_) => ",keys_scaled,mean_key_norm,max_key_norm",
            None => "",
        };
        // With Prodigy, one more: its step-size estimate d.
        let d_header = match self.cfg.optimizer.prodigy() {
            Some(_) => ",prodigy_d",
            None => "",
        };
        if self.cfg.resume.is_none() || !csv_exists {
            writeln!(
                csv,
                "step,epoch,loss,diffusion,cultural,lr,grad_norm{norms_header}{d_header}"
            )
            .map_err(|e| Error::io(&self.outputs.log_csv, e))?;
        }
        if self.cfg.resume.is_none() && self.outputs.val_csv.exists() {
            std::fs::remove_file(&self.outputs.val_csv)
                .map_err(|e| Error::io(&self.outputs.val_csv, e))?;
        }
        self.check_previews()?;
        if self.cfg.sample_at_first {
            self.sample()?;
        }
        while self.state.step < self.total_steps {
            let mut log = self.step()?;
            if log.step % self.val_every == 0 || log.step == self.total_steps {
                log.val = self.validation_loss()?;
                if let Some(v) = log.val {
                    self.log_validation(log.step, v)?;
                }
            }
            let cult = log.cultural.map_or(String::new(), |c| format!("{c}"));
            let norms = log.weight_norms.map_or(String::new(), |w| {
                format!(",{},{},{}", w.keys_scaled, w.mean_norm, w.max_norm)
            });
            let d = log.prodigy_d.map_or(String::new(), |d| format!(",{d}"));
            writeln!(
                csv,
                "{},{},{},{},{},{},{}{norms}{d}",
                log.step, log.epoch, log.loss, log.diffusion, cult, log.lr, log.grad_norm
            )
            .map_err(|e| Error::io(&self.outputs.log_csv, e))?;
            csv.flush()
                .map_err(|e| Error::io(&self.outputs.log_csv, e))?;
            if self
                .cfg
                .save_every
                .is_some_and(|n| n > 0 && log.step % n == 0)
            {
                self.save_checkpoint()?;
            }
            if self
                .cfg
                .sample_every
                .is_some_and(|n| n > 0 && log.step % n == 0)
            {
                self.sample()?;
            }
            on_step(&log);
        }
        self.save_adapter()?;
        let points = read_loss_log(&self.outputs.log_csv)?;
        let val = super::validation::read_val_log(&self.outputs.val_csv)?;
        super::plot::plot_loss(
            &self.outputs.plot,
            &format!("{} loss", self.cfg.method.name()),
            &points,
            &val,
        )
    }
}

/// (step, loss) pairs of a CSV log.
pub fn read_loss_log(path: &Path) -> Result<Vec<(u64, f64)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut it = l.split(',');
            let step = it.next()?.parse().ok()?;
            let _epoch = it.next();
            Some((step, it.next()?.parse().ok()?))
        })
        .collect())
}
