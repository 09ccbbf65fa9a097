//! `kstyle eval`: generate (or read) images for the vanilla model and each adapter over a prompt
//! set and several seeds, then score them: CSS (All / Explicit / Generic), CLIP score and LPIPS
//! diversity, written as a markdown table, a JSON of every number and a PNG grid.
//!
//! Image layout (what `--images DIR` reads back): `DIR/<method>/p<prompt>-s<seed>.png`, with the
//! prompts of the run in `DIR/prompts.tsv`.

use super::metrics::{clip_score_per_image, css_per_image};
use super::prompts::{parse, EvalPrompt, PromptKind};
use super::report::{markdown_table, write_json, ImageScore, MethodResult, Stat};
use crate::image::grid::{compose_grid, GridSpec};
use crate::image::io::{load_rgb, rgb_to_chw, save_chw_png, save_png, PixelRange};
use crate::models::clip::model::ClipModel;
use crate::models::clip::preprocess::ClipPreprocess;
use crate::models::clip::text::token_ids;
use crate::models::clip::tokenizer::ClipTokenizer;
use crate::models::lpips::Lpips;
use crate::sample::model_files::file_identity;
use crate::sample::pipeline::{LoadOptions, Request, SamplerKind, SdxlPipeline, Sigmas};
use crate::{DType, Device, Error, Result, Tensor};
use std::path::{Path, PathBuf};

/// What to evaluate and how.
#[derive(Clone, Debug)]
pub struct EvalConfig {
    pub clip: PathBuf,
    pub lpips: PathBuf,
    pub concepts: Vec<String>,
    pub prompts: Vec<EvalPrompt>,
    pub seeds: Vec<u64>,
    pub out: PathBuf,
    pub device: Device,
    /// Generation settings; unused in `--images` mode.
    pub generate: Option<GenerateSettings>,
}

#[derive(Clone, Debug)]
pub struct GenerateSettings {
    pub model: PathBuf,
    pub config: Option<PathBuf>,
    pub adapters: Vec<PathBuf>,
    pub steps: usize,
    pub guidance: f64,
    pub size: usize,
    /// A VAE replacing the model's (see `ModelFiles::with_vae`).
    pub vae: Option<PathBuf>,
    /// diffusers' `clip_skip` (see [`SdxlPipeline::set_clip_skip`]).
    pub clip_skip: usize,
    /// Tiled VAE decoding (see `AutoencoderKL::tiling`).
    pub vae_tiling: bool,
    /// The sampler (`Auto`: the model's scheduler config's) and its sigma ramp (`Config`: the
    /// sampler's own), as `generate --sampler --sigmas`.
    pub sampler: SamplerKind,
    pub sigmas: Sigmas,
}

impl GenerateSettings {
    /// The sampler as the record names it: "euler" for the default (Euler on the config's
    /// sigmas, what every earlier record means), else the request spelt out.
    fn sampler_record(&self) -> String {
        match (self.sampler, self.sigmas) {
            (SamplerKind::Euler(Sigmas::Config), Sigmas::Config) => "euler".into(),
            (kind, Sigmas::Config) => format!("{kind:?}"),
            (kind, s) => format!("{kind:?} on {} sigmas", s.name()),
        }
    }
}

pub fn image_path(dir: &Path, method: &str, prompt: usize, seed: u64) -> PathBuf {
    dir.join(method).join(format!("p{prompt:03}-s{seed}.png"))
}

/// Column names for the adapters: file stems, prefixed by the folder name when two stems collide,
/// numbered as a last resort.
pub fn method_names(adapters: &[PathBuf]) -> Vec<String> {
    let stem = |p: &Path| {
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "adapter".into())
    };
    let mut names: Vec<String> = adapters.iter().map(|a| stem(a)).collect();
    for i in 0..names.len() {
        if names.iter().filter(|n| **n == names[i]).count() > 1 || names[i] == "vanilla" {
            let parent = adapters[i]
                .parent()
                .and_then(|p| p.file_name())
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            names[i] = format!("{parent}-{}", stem(&adapters[i]));
        }
    }
    for i in 0..names.len() {
        if names[..i].contains(&names[i]) {
            names[i] = format!("{}-{i}", names[i]);
        }
    }
    names
}

fn write_prompts(path: &Path, prompts: &[EvalPrompt]) -> Result<()> {
    let text: String = prompts
        .iter()
        .map(|p| format!("{}\t{}\t{}\n", p.category, p.kind.name(), p.text))
        .collect();
    crate::tensor::write_atomic(path, text.as_bytes())
}

/// A method folder's record of what its images were generated from.
const RECORD: &str = "generated.json";

/// What one method's images depend on: the model, config, adapter and VAE files (paths, sizes,
/// modification times), the settings and the prompt texts. Seeds are not in it: each seed is
/// its own file, and a run with more seeds adds the missing ones.
fn generation_record(
    cfg: &EvalConfig,
    g: &GenerateSettings,
    adapter: Option<&Path>,
) -> serde_json::Value {
    let id = |p: &Path| file_identity(p);
    serde_json::json!({
        "model": id(&g.model),
        "config": g.config.as_deref().map(id),
        "adapter": adapter.map(id),
        "vae": g.vae.as_deref().map(id),
        "clip_skip": g.clip_skip,
        "vae_tiling": g.vae_tiling,
        "steps": g.steps,
        "guidance": g.guidance,
        "size": g.size,
        "sampler": g.sampler_record(),
        "prompts": cfg.prompts.iter().map(|p| p.text.as_str()).collect::<Vec<_>>(),
    })
}

/// Images already in `dir` are reused only when its record matches `record`: a folder holding
/// images of other settings (or of an unknown run) is refused, naming what differs, rather than
/// silently mixed into the table.
fn check_record(dir: &Path, record: &serde_json::Value) -> Result<()> {
    let path = dir.join(RECORD);
    let has_images = std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.filter_map(|e| e.ok())
            .any(|e| e.path().extension().is_some_and(|x| x == "png"))
    });
    let refuse = |what: String| {
        Err(Error::file(
            dir,
            format!(
                "{what}; remove the folder or choose another --out (its images would be scored \
                 as this run's)"
            ),
        ))
    };
    let old: serde_json::Value = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.clone(),
            msg: e.to_string(),
        })?,
        Err(_) if has_images => {
            return refuse(format!(
                "holds images but no {RECORD} saying how they were made"
            ))
        }
        Err(_) => return Ok(()),
    };
    let keys = record
        .as_object()
        .map(|o| o.keys().cloned().collect::<Vec<_>>());
    let differ: Vec<String> = keys
        .unwrap_or_default()
        .into_iter()
        .filter(|k| old.get(k) != record.get(k))
        .collect();
    match differ.is_empty() {
        true => Ok(()),
        false => refuse(format!(
            "its images were generated with other {}",
            differ.join(", ")
        )),
    }
}

/// Generate every (method, prompt, seed) image that is not on disk yet.
fn generate_all(
    cfg: &EvalConfig,
    g: &GenerateSettings,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<String>> {
    let mut methods = vec![("vanilla".to_string(), None)];
    for (a, name) in g.adapters.iter().zip(method_names(&g.adapters)) {
        methods.push((name, Some(a.clone())));
    }
    // Every method folder's record is checked before anything is written.
    let mut records = Vec::new();
    for (name, adapter) in &methods {
        let dir = cfg.out.join(name);
        let record = generation_record(cfg, g, adapter.as_deref());
        check_record(&dir, &record)?;
        records.push((dir, record));
    }
    write_prompts(&cfg.out.join("prompts.tsv"), &cfg.prompts)?;
    for (dir, record) in &records {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let text = serde_json::to_string_pretty(record).map_err(|e| Error::msg(e.to_string()))?;
        crate::tensor::write_atomic(&dir.join(RECORD), text.as_bytes())?;
    }
    for (name, adapter) in &methods {
        let loras = adapter.iter().map(|a| (a.clone(), 1.0)).collect();
        let opts = LoadOptions {
            model: g.model.clone(),
            config: g.config.clone(),
            dtype: DType::F32,
            weight_dtype: None,
            device: cfg.device,
            loras,
            vae: g.vae.clone(),
        };
        let mut pipe = SdxlPipeline::load(&opts)?;
        pipe.set_clip_skip(g.clip_skip)?;
        pipe.vae.tiling = g.vae_tiling;
        let sampler = g.sampler.resolve(&pipe.scheduler)?;
        let sampler = match g.sigmas {
            Sigmas::Config => sampler,
            s => sampler.with_sigmas(s, &pipe.scheduler)?,
        };
        if adapter.is_none() {
            log(&format!("sampler: {}", sampler.describe(&pipe.scheduler)));
        }
        // Once: every method reads the same tokenizers.
        for (pi, p) in cfg.prompts.iter().enumerate().filter(|_| adapter.is_none()) {
            if let Some(cut) = pipe.truncated(&p.text)? {
                log(&format!(
                    "warning: prompt {pi} is longer than CLIP's 77 tokens; the end is dropped, as \
                     in diffusers: \"{cut}\""
                ));
            }
        }
        for (pi, p) in cfg.prompts.iter().enumerate() {
            for &seed in &cfg.seeds {
                let path = image_path(&cfg.out, name, pi, seed);
                if path.exists() {
                    continue;
                }
                log(&format!("{name}: prompt {pi} seed {seed}"));
                let req = Request {
                    prompt: p.text.clone(),
                    negative: None,
                    steps: g.steps,
                    guidance: g.guidance,
                    guidance_rescale: 0.0,
                    width: g.size,
                    height: g.size,
                    sampler,
                    // As `generate` seeds an image's step noise.
                    noise: crate::sample::Noise::for_seed(seed),
                    denoising_end: None,
                    micro: Default::default(),
                };
                let init = pipe.initial_latents(g.size, g.size, seed)?;
                let img = pipe.generate(&req, &init, |_, _| {})?; // (1, 3, H, W) in [0, 1]
                let (_, c, h, w) = img.dims4()?;
                save_chw_png(&path, &img.to_vec_f32()?, c, h, w)?;
            }
        }
    }
    Ok(methods.into_iter().map(|(n, _)| n).collect())
}

/// Score one method's images.
fn score_method(cfg: &EvalConfig, method: &str, scorer: &Scorer) -> Result<MethodResult> {
    let mut per_image = Vec::new();
    let mut lpips_per_prompt = Vec::new();
    for (pi, p) in cfg.prompts.iter().enumerate() {
        let paths: Vec<PathBuf> = cfg
            .seeds
            .iter()
            .map(|&s| image_path(&cfg.out, method, pi, s))
            .collect();
        let imgs = paths.iter().map(load_rgb).collect::<Result<Vec<_>>>()?;
        let pixels = Tensor::from_vec(
            scorer.pre.apply_batch(&imgs)?,
            (imgs.len(), 3, scorer.pre.crop_h, scorer.pre.crop_w),
            cfg.device,
        )?;
        let emb = crate::autograd::no_grad(|| scorer.clip.get_image_features(&pixels))?; // (S, E)
        let css = css_per_image(&emb, &scorer.concepts)?.to_vec_f64()?;
        let ids = token_ids(
            &scorer.tok.encode_batch(&vec![p.text.clone(); imgs.len()])?,
            cfg.device,
        )?;
        let text = crate::autograd::no_grad(|| scorer.clip.get_text_features(&ids))?; // (S, E)
        let cs = clip_score_per_image(&emb, &text)?.to_vec_f64()?;
        for (i, &seed) in cfg.seeds.iter().enumerate() {
            per_image.push(ImageScore {
                prompt: p.text.clone(),
                category: p.category.clone(),
                kind: p.kind.name().into(),
                seed,
                css: css[i],
                clip_score: cs[i],
                image: paths[i].display().to_string(),
            });
        }
        // LPIPS diversity: mean pairwise distance between the seeds of one prompt.
        if imgs.len() >= 2 {
            let signed: Vec<Tensor> = imgs
                .iter()
                .map(|im| {
                    Tensor::from_vec(
                        rgb_to_chw(im, PixelRange::Signed),
                        (1, 3, im.height() as usize, im.width() as usize),
                        cfg.device,
                    )
                })
                .collect::<Result<_>>()?;
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for i in 0..signed.len() {
                for j in i + 1..signed.len() {
                    a.push(signed[i].clone());
                    b.push(signed[j].clone());
                }
            }
            let d = crate::autograd::no_grad(|| {
                scorer
                    .lpips
                    .distance(&Tensor::cat(&a, 0)?, &Tensor::cat(&b, 0)?)
            })?
            .to_vec_f64()?;
            lpips_per_prompt.push(d.iter().sum::<f64>() / d.len() as f64);
        }
    }
    let pick = |kind: Option<PromptKind>, f: fn(&ImageScore) -> f64| -> Stat {
        let v: Vec<f64> = per_image
            .iter()
            .filter(|s| kind.is_none_or(|k| s.kind == k.name()))
            .map(f)
            .collect();
        Stat::of(&v)
    };
    Ok(MethodResult {
        method: method.into(),
        css_all: pick(None, |s| s.css),
        css_explicit: pick(Some(PromptKind::Explicit), |s| s.css),
        css_generic: pick(Some(PromptKind::Generic), |s| s.css),
        clip_score: pick(None, |s| s.clip_score),
        lpips_diversity: Stat::of(&lpips_per_prompt),
        per_image,
    })
}

struct Scorer {
    clip: ClipModel,
    tok: ClipTokenizer,
    pre: ClipPreprocess,
    concepts: Tensor,
    lpips: Lpips,
}

/// The grid: one row per prompt, one column per method, first seed.
fn write_grid(cfg: &EvalConfig, methods: &[String]) -> Result<PathBuf> {
    let seed = cfg.seeds[0];
    let mut cells = Vec::new();
    for pi in 0..cfg.prompts.len() {
        for m in methods {
            cells.push(load_rgb(image_path(&cfg.out, m, pi, seed))?);
        }
    }
    let rows = cfg
        .prompts
        .iter()
        .map(|p| format!("{} ({})", p.category, p.kind.name()))
        .collect();
    let spec = GridSpec::new(cfg.prompts.len(), methods.len()).with_labels(rows, methods.to_vec());
    let path = cfg.out.join("grid.png");
    save_png(&path, &compose_grid(&cells, &spec)?)?;
    Ok(path)
}

/// Run the whole evaluation; returns the results (also written to `out`).
pub fn run_eval(
    cfg: &EvalConfig,
    methods_in_images: Option<Vec<String>>,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<MethodResult>> {
    if cfg.seeds.is_empty() || cfg.prompts.is_empty() {
        return Err(Error::Config(
            "eval needs at least one prompt and one seed".into(),
        ));
    }
    std::fs::create_dir_all(&cfg.out).map_err(|e| Error::io(&cfg.out, e))?;
    let methods = match (&cfg.generate, methods_in_images) {
        (Some(g), _) => generate_all(cfg, g, log)?,
        (None, Some(m)) => m,
        (None, None) => {
            return Err(Error::Config(
                "eval needs --model (to generate) or --images".into(),
            ))
        }
    };
    let clip = ClipModel::from_folder(&cfg.clip, DType::F32, cfg.device)?;
    let tok = ClipTokenizer::from_folder(&cfg.clip)?;
    let pre_cfg = cfg.clip.join("preprocessor_config.json");
    let pre = if pre_cfg.exists() {
        ClipPreprocess::from_config(&pre_cfg)?
    } else {
        ClipPreprocess::openai(224)
    };
    let ids = token_ids(&tok.encode_batch(&cfg.concepts)?, cfg.device)?;
    let concepts =
        crate::autograd::no_grad(|| clip.get_text_features(&ids)?.normalize_l2(1, 1e-12))?;
    let scorer = Scorer {
        clip,
        tok,
        pre,
        concepts,
        lpips: Lpips::from_file(&cfg.lpips, cfg.device)?,
    };
    let mut results = Vec::new();
    for m in &methods {
        log(&format!("scoring {m}"));
        results.push(score_method(cfg, m, &scorer)?);
    }
    crate::tensor::write_atomic(
        &cfg.out.join("table.md"),
        markdown_table(&results).as_bytes(),
    )?;
    write_json(&cfg.out.join("results.json"), &results)?;
    write_grid(cfg, &methods)?;
    Ok(results)
}

/// Methods, prompts and seeds of an image folder written by a previous run (`--images DIR`).
pub fn scan_images(dir: &Path) -> Result<(Vec<String>, Vec<EvalPrompt>, Vec<u64>)> {
    let tsv = dir.join("prompts.tsv");
    let text = std::fs::read_to_string(&tsv).map_err(|e| Error::io(&tsv, e))?;
    let prompts = parse(&text, "", &tsv)?;
    let mut methods: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    methods.sort_by_key(|m| (m != "vanilla", m.clone()));
    if methods.is_empty() {
        return Err(Error::file(
            dir,
            "no method folders (expected <method>/p<prompt>-s<seed>.png)",
        ));
    }
    // The seeds are those of the first prompt of the first method; scoring then requires every
    // (method, prompt, seed) image and names any that is missing.
    let first = dir.join(&methods[0]);
    let mut seeds: Vec<u64> = std::fs::read_dir(&first)
        .map_err(|e| Error::io(&first, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("p000-s")?
                .strip_suffix(".png")?
                .parse()
                .ok()
        })
        .collect();
    seeds.sort();
    if seeds.is_empty() {
        return Err(Error::file(&first, "no images named p000-s<seed>.png"));
    }
    Ok((methods, prompts, seeds))
}
