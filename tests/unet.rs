//! The SDXL UNet: reference cases on the tiny fixtures, parameter counts from configs alone,
//! adapter enumeration, gradient checkpointing that changes no bit, odd latent sizes, and load
//! errors that name the offending key.

use kstyle::autograd::{no_grad, Op};
use kstyle::formats::diffusers::DiffusersFolder;
use kstyle::models::unet::embeddings::timestep_embedding;
use kstyle::models::unet::{
    param_count, param_shapes, CheckpointPolicy, UNet2DConditionModel, UNetConfig,
};
use kstyle::nn::lora::{LoraAdapter, LoraConfig};
use kstyle::nn::weights::tensor_from_raw;
use kstyle::nn::Weights;
use kstyle::tensor::{Rng, SafeTensorsFile};
use kstyle::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn tiny(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(p)
}

fn tiny_config() -> UNetConfig {
    UNetConfig::from_file(tiny("sdxl/unet/config.json")).unwrap()
}

/// The tiny UNet's tensors by diffusers key, as stored (fp16).
fn tiny_tensors() -> BTreeMap<String, Tensor> {
    let folder = DiffusersFolder::open(tiny("sdxl")).unwrap();
    let comp = folder.component("unet", None).unwrap();
    let map = comp.tensors().unwrap();
    map.iter()
        .map(|(k, r)| (k.clone(), tensor_from_raw(r, &comp.dir, k).unwrap()))
        .collect()
}

fn tiny_unet() -> UNet2DConditionModel {
    UNet2DConditionModel::from_diffusers(tiny("sdxl"), &[], DType::F32, Device::Cpu)
        .unwrap()
        .model
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape.to_vec(), &mut Rng::new(seed), DType::F32, Device::Cpu).unwrap()
}

#[test]
fn verify_cases_pass_on_the_tiny_fixtures() {
    let only: Vec<String> = ["unet", "unet_kohya_lora", "single_file"]
        .map(String::from)
        .to_vec();
    let report = kstyle::verify::run(&tiny(""), Device::Cpu, Some(&only)).unwrap();
    assert!(report.failed_cases.is_empty(), "{:?}", report.failed_cases);
    for case in &only {
        assert!(
            report.rows.iter().any(|r| &r.case == case),
            "case {case} did not run"
        );
    }
    // one output row per forward case, one row per component for the single file
    assert_eq!(report.rows.len(), 6);
    for r in &report.rows {
        assert!(
            r.passed,
            "{} {}: {:e} > {:e}",
            r.case, r.tensor, r.error, r.tolerance
        );
    }
}

#[test]
fn sdxl_base_parameter_count_from_its_config() {
    let counts: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tiny("sdxl_base_configs/param_counts.json")).unwrap(),
    )
    .unwrap();
    let want = counts["unet"].as_u64().unwrap() as usize;
    assert_eq!(want, 2_567_463_684);
    let cfg = UNetConfig::from_file(tiny("sdxl_base_configs/unet/config.json")).unwrap();
    assert_eq!(param_count(&cfg), want);
    assert_eq!(param_shapes(&cfg).0.len(), 1680);
    assert_eq!(cfg, UNetConfig::sdxl_base());
}

/// The built-in refiner architecture (`sd_xl_refiner_1.0.safetensors` without `--config`) has
/// the parameters diffusers builds from sgm's `sd_xl_refiner.yaml`, and every one has the sgm
/// name diffusers' own conversion gives it: count, tensor count and the sha256 of the sorted
/// "<sgm key> <diffusers key> <shape>" listing, all from `gen_refiner_single_file.py`.
#[test]
fn sdxl_refiner_parameters_and_sgm_names_from_its_config() {
    use sha2::{Digest, Sha256};
    let extra = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/extra");
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(extra.join("sdxl_refiner_configs/layout.json")).unwrap(),
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("kstyle-refiner-preset-{}", std::process::id()));
    let preset = kstyle::models::presets::Preset::SdxlRefiner
        .materialize(&dir)
        .unwrap();
    let cfg = UNetConfig::from_file(preset.join("unet/config.json")).unwrap();
    assert_eq!(
        param_count(&cfg) as u64,
        want["parameters"].as_u64().unwrap()
    );
    let shapes = param_shapes(&cfg).0;
    assert_eq!(shapes.len() as u64, want["tensors"].as_u64().unwrap());
    let map =
        kstyle::formats::unet_layout::UnetLayout::from_config_file(preset.join("unet/config.json"))
            .unwrap()
            .key_map();
    let mut lines: Vec<String> = shapes
        .iter()
        .map(|(k, shape)| format!("{} {k} {shape:?}\n", map.to_sgm(k).unwrap()))
        .collect();
    lines.sort();
    let digest = Sha256::digest(lines.concat().as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        want["listing_sha256"].as_str().unwrap(),
        "{}",
        lines.concat()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tiny_parameter_shapes_are_exactly_the_checkpoint() {
    let tensors = tiny_tensors();
    let stored: usize = tensors.values().map(|t| t.elem_count()).sum();
    assert_eq!(param_count(&tiny_config()), stored);
    let ours: BTreeMap<String, Vec<usize>> = param_shapes(&tiny_config()).0.into_iter().collect();
    let theirs: BTreeMap<String, Vec<usize>> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    assert_eq!(ours, theirs);
}

#[test]
fn timestep_sinusoid_matches_the_spec_values() {
    // SDXL.md 1.3 (float64 values; the sinusoid is float32 as in diffusers).
    let t = Tensor::from_vec(vec![981.0f32, 1024.0, 0.0], 3, Device::Cpu).unwrap();
    let e = timestep_embedding(&t, 320, true, 0.0)
        .unwrap()
        .to_vec_f64()
        .unwrap();
    for (i, want) in [
        (0, 0.679957),
        (1, -0.798430),
        (159, 0.994606),
        (160, 0.733252),
        (161, 0.602088),
        (319, 0.103726),
    ] {
        assert!(
            (e[i] - want).abs() < 1e-4,
            "t=981 e[{i}] = {} vs {want}",
            e[i]
        );
    }
    let e = timestep_embedding(&t, 256, true, 0.0)
        .unwrap()
        .to_vec_f64()
        .unwrap();
    for (i, want) in [
        (0, 0.987354),
        (1, -0.537610),
        (127, 0.993952),
        (128, -0.158533),
        (129, -0.843193),
        (255, 0.109818),
    ] {
        assert!(
            (e[256 + i] - want).abs() < 1e-4,
            "t=1024 e[{i}] = {} vs {want}",
            e[256 + i]
        );
    }
    // t = 0: the cosine half is all ones, the sine half all zeros
    assert!(e[512..640].iter().all(|&v| v == 1.0) && e[640..].iter().all(|&v| v == 0.0));
}

/// The linears an adapter can wrap are every nn.Linear of diffusers' spatial transformers
/// (gen_train_targets.py's, which kohya's LoRA trains); the attention projections among them
/// are the reference trainer's targets.
#[test]
fn adaptable_linears_are_the_reference_trainer_targets() {
    let unet = tiny_unet();
    let paths: Vec<String> = unet
        .adaptable_linears()
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    let modules = |file: &str| -> Vec<String> {
        let f = SafeTensorsFile::open(tiny(file)).unwrap();
        let mut m: Vec<String> = f
            .names()
            .filter_map(|n| n.strip_prefix("param.")?.strip_suffix(".lora_A"))
            .map(String::from)
            .collect();
        m.sort();
        m
    };
    let mut got = paths.clone();
    got.sort();
    assert_eq!(got, modules("../extra/train_targets_lora.safetensors"));
    let attention = ["to_q", "to_k", "to_v", "to_out.0"];
    got.retain(|p| attention.iter().any(|t| p.ends_with(&format!(".{t}"))));
    assert_eq!(got, modules("reference/train_step_lora.safetensors"));
    assert!(
        paths.contains(&"down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k".to_string())
    );
    // named_modules order: proj_in, then block by block attn1's four, attn2's four and the
    // feed-forward's two, then proj_out.
    assert!(paths[0].ends_with("attentions.0.proj_in"));
    assert!(paths[1].ends_with("transformer_blocks.0.attn1.to_q"));
    assert!(paths[8].ends_with("transformer_blocks.0.attn2.to_out.0"));
    assert!(paths[10].ends_with("transformer_blocks.0.ff.net.2"));
    assert!(paths[11].ends_with("transformer_blocks.1.attn1.to_q"));
}

/// Plain adapters on self-attention, gated ones on cross-attention; B is non-zero so every
/// adapter tensor gets a gradient.
fn attach_tiny_adapters(unet: &mut UNet2DConditionModel) {
    let mut rng = Rng::new(7);
    let concepts = randn(&[3, 8], 11).normalize_l2(1, 1e-12).unwrap();
    let config = LoraConfig {
        rank: 2,
        alpha: 2.0,
        guidance: 1.5,
        gate_hidden: 4,
        mod_hidden: 4,
    };
    let mut seed = 100;
    let n = unet
        .attach_adapters(|path, base| {
            let gated = path.contains("attn2");
            let (d_in, d_out) = (base.in_features(), base.out_features());
            let concepts = gated.then_some(&concepts);
            let mut a = LoraAdapter::init(
                d_in,
                d_out,
                config,
                concepts,
                &mut rng,
                DType::F32,
                Device::Cpu,
            )?;
            seed += 1;
            a.b = randn(&[d_out, config.rank], seed).scale(0.1)?.var()?;
            Ok(Some(a))
        })
        .unwrap();
    assert_eq!(n, unet.adaptable_linears().len());
}

/// Checkpoint segments in the recorded graph of `t`.
fn segments(t: &Tensor) -> usize {
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![t.clone()];
    let mut n = 0;
    while let Some(t) = stack.pop() {
        if !seen.insert(t.id()) {
            continue;
        }
        if let Some(op) = t.op() {
            n += usize::from(matches!(op, Op::Checkpoint(_)));
            stack.extend(op.inputs().into_iter().cloned());
        }
    }
    n
}

/// (output bits, gradient bits per adapter tensor, checkpoint segments in the graph).
type Run = (Vec<u32>, Vec<Vec<u32>>, usize);

fn grads_with(unet: &mut UNet2DConditionModel, policy: CheckpointPolicy) -> Run {
    unet.checkpoint = policy;
    let (b, h, w) = (2, 8, 8);
    let sample = randn(&[b, 4, h, w], 1);
    let t = Tensor::from_vec(vec![999.0f32, 10.0], 2, Device::Cpu).unwrap();
    let ctx = randn(&[b, 77, 64], 2);
    let text = randn(&[b, 32], 3);
    let ids = Tensor::from_vec(
        [64.0f32, 64.0, 0.0, 0.0, 64.0, 64.0].repeat(2),
        (b, 6),
        Device::Cpu,
    )
    .unwrap();
    let out = unet.forward(&sample, &t, &ctx, &text, &ids).unwrap();
    let r = randn(out.dims(), 4);
    let grads = out.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    let bits = |t: &Tensor| {
        t.to_vec_f32()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<u32>>()
    };
    let params = unet.adapter_parameters();
    assert!(!params.is_empty());
    let g = params
        .iter()
        .map(|(name, p)| {
            bits(
                grads
                    .get(p)
                    .unwrap_or_else(|| panic!("no gradient for {name}")),
            )
        })
        .collect();
    (bits(&out), g, segments(&out))
}

#[test]
fn checkpointed_gradients_equal_plain_gradients_bit_for_bit() {
    let mut unet = tiny_unet();
    attach_tiny_adapters(&mut unet);
    let plain = grads_with(&mut unet, CheckpointPolicy::None);
    assert_eq!(plain.2, 0);
    // The tiny UNet has 22 transformer blocks: all of them, then blocks 0, 3, ..., 21.
    for (policy, n) in [
        (CheckpointPolicy::EveryBlock, 22),
        (CheckpointPolicy::EveryNth(3), 8),
    ] {
        let ck = grads_with(&mut unet, policy);
        assert_eq!(ck.2, n, "{policy:?}: checkpoint segments");
        assert!(ck.0 == plain.0, "{policy:?}: outputs differ");
        assert_eq!(ck.1.len(), plain.1.len());
        for (k, (a, b)) in ck.1.iter().zip(&plain.1).enumerate() {
            assert!(a == b, "{policy:?}: gradient {k} differs");
        }
    }
}

#[test]
fn odd_latent_sizes_follow_the_skip_sizes() {
    let unet = tiny_unet();
    let (b, h, w) = (1, 15, 9);
    let out = no_grad(|| {
        let t = Tensor::from_vec(vec![500.0f32], 1, Device::Cpu)?;
        let ids = Tensor::from_vec(
            vec![120.0f32, 72.0, 0.0, 0.0, 120.0, 72.0],
            (b, 6),
            Device::Cpu,
        )?;
        unet.forward(
            &randn(&[b, 4, h, w], 5),
            &t,
            &randn(&[b, 77, 64], 6),
            &randn(&[b, 32], 7),
            &ids,
        )
    })
    .unwrap();
    assert_eq!(out.dims(), &[b, 4, h, w]);
    assert!(out.to_vec_f64().unwrap().iter().all(|v| v.is_finite()));
}

#[test]
fn cropped_x2_upsampling_is_pytorchs_nearest_to_size() {
    // PyTorch's `interpolate(size=out, mode="nearest")` for out != 2 * in picks
    // floor(dst * (float)in / out) in float32; the upsampler crops x2 upsampling instead.
    for out in 1usize..600 {
        let input = out.div_ceil(2);
        if out == 2 * input {
            continue;
        }
        let scale = input as f32 / out as f32;
        for dst in 0..out {
            let torch = ((dst as f32 * scale).floor() as usize).min(input - 1);
            assert_eq!(torch, dst / 2, "in {input} out {out} dst {dst}");
        }
    }
}

#[test]
fn mis_shaped_missing_and_left_over_weights_are_named() {
    let cfg = tiny_config();
    let key = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight";
    let mut tensors = tiny_tensors();
    tensors.insert(key.into(), randn(&[3, 5], 1));
    let vb = Weights::from_map(tensors, "tiny-unet", DType::F32, Device::Cpu);
    let err = UNet2DConditionModel::load(&vb, &cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains(key) && err.contains("[3, 5]"), "{err}");

    let mut tensors = tiny_tensors();
    tensors.remove("up_blocks.0.upsamplers.0.conv.bias");
    let vb = Weights::from_map(tensors, "tiny-unet", DType::F32, Device::Cpu);
    let err = UNet2DConditionModel::load(&vb, &cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains("up_blocks.0.upsamplers.0.conv.bias"), "{err}");

    let mut tensors = tiny_tensors();
    tensors.insert("mid_block.extra.weight".into(), randn(&[2], 1));
    let vb = Weights::from_map(tensors, "tiny-unet", DType::F32, Device::Cpu);
    UNet2DConditionModel::load(&vb, &cfg).unwrap();
    let err = vb.ensure_all_used(|_| false).unwrap_err().to_string();
    assert!(err.contains("mid_block.extra.weight"), "{err}");
}

#[test]
fn single_file_loads_the_same_model_as_the_folder() {
    let cfg = tiny_config();
    let a = tiny_unet();
    let b = UNet2DConditionModel::from_single_file(
        tiny("sdxl_single_file.safetensors"),
        &cfg,
        &[],
        DType::F32,
        Device::Cpu,
    )
    .unwrap()
    .model;
    let pa = a.adaptable_linears();
    let pb = b.adaptable_linears();
    assert_eq!(pa.len(), pb.len());
    for ((na, la), (nb, lb)) in pa.iter().zip(&pb) {
        assert_eq!(na, nb);
        assert_eq!(
            la.base.weight.to_vec_f32().unwrap(),
            lb.base.weight.to_vec_f32().unwrap()
        );
    }
}

/// The UNet's backward with plain LoRA on every attention projection, against the reference
/// training step (the trainer owns the full case; this pins the UNet's part: forward, loss and
/// every adapter gradient through convs, norms, attention, resampling and skips).
#[test]
fn plain_lora_gradients_through_the_unet_match_the_reference_step() {
    use kstyle::tolerance::{compare, l2, Tolerance};
    let f = SafeTensorsFile::open(tiny("reference/train_step_lora.safetensors")).unwrap();
    let meta = |k: &str| f.metadata()[k].parse::<f64>().unwrap();
    let load = |k: &str| f.tensor(k).unwrap().to_dtype(DType::F32).unwrap();
    let mut unet = tiny_unet();
    let mut rng = Rng::new(0);
    unet.attach_adapters(|path, base| {
        if !f.contains(&format!("param.{path}.lora_A")) {
            return Ok(None);
        }
        let a = load(&format!("param.{path}.lora_A"));
        let config = LoraConfig {
            rank: a.dims()[0],
            alpha: meta("alpha"),
            ..LoraConfig::default()
        };
        let mut ad = LoraAdapter::init(
            base.in_features(),
            base.out_features(),
            config,
            None,
            &mut rng,
            DType::F32,
            Device::Cpu,
        )?;
        ad.a = a.var()?;
        ad.b = load(&format!("param.{path}.lora_B")).var()?;
        Ok(Some(ad))
    })
    .unwrap();
    // z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with SDXL's scaled-linear schedule
    let t = load("timestep");
    let abar: Vec<f64> = {
        let (s, e) = (0.00085f64.sqrt(), 0.012f64.sqrt());
        let mut acc = 1.0;
        (0..1000)
            .map(|i| {
                let b = (s + (e - s) * i as f64 / 999.0).powi(2);
                acc *= 1.0 - b;
                acc
            })
            .collect()
    };
    let (x0, eps) = (load("x0"), load("noise"));
    let (b, c, h, w) = x0.dims4().unwrap();
    let per_sample = |g: &dyn Fn(f64) -> f64| {
        let v: Vec<f32> = t
            .to_vec_f64()
            .unwrap()
            .iter()
            .flat_map(|&ti| vec![g(abar[ti as usize]) as f32; c * h * w])
            .collect();
        Tensor::from_vec(v, (b, c, h, w), Device::Cpu).unwrap()
    };
    let zt = x0
        .mul(&per_sample(&|a| a.sqrt()))
        .unwrap()
        .add(&eps.mul(&per_sample(&|a| (1.0 - a).sqrt())).unwrap())
        .unwrap();
    let eps_hat = unet
        .forward(
            &zt,
            &t,
            &load("encoder_hidden_states"),
            &load("text_embeds"),
            &load("time_ids"),
        )
        .unwrap();
    let loss = eps_hat
        .sub(&eps)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let c = compare(
        &loss,
        &f.tensor("loss.diffusion").unwrap(),
        Tolerance::F32_FORWARD,
    )
    .unwrap();
    assert!(c.passed(), "loss: {:e}", c.relative());
    let grads = loss.backward().unwrap();
    let floor = f
        .names()
        .filter(|n| n.starts_with("grad."))
        .map(|n| l2(&f.tensor(n).unwrap().to_vec_f64().unwrap()))
        .fold(0.0, f64::max);
    let params = unet.adapter_parameters();
    assert_eq!(params.len(), meta("n_params") as usize);
    for (name, p) in params {
        let want = f.tensor(&format!("grad.{name}")).unwrap();
        let c = compare(
            grads.get(&p).unwrap(),
            &want,
            Tolerance::F32_GRAD.grad_with_floor(floor),
        )
        .unwrap();
        assert!(c.passed(), "grad.{name}: {:e}", c.relative());
    }
}

/// Every float8 byte decodes as PyTorch decodes it (`tests/fixtures/extra/gen_fp8.py`): both
/// `float8_e4m3fn` and `float8_e5m2`, NaNs and infinities included.
#[test]
fn float8_bytes_decode_as_pytorch_does() {
    use kstyle::formats::raw::f8_to_f32;
    let file = kstyle::formats::MappedFile::open(tiny("../extra/fp8_decode.safetensors")).unwrap();
    let map = file.tensors().unwrap();
    for kind in ["e4m3", "e5m2"] {
        let raw = &map[kind];
        let want = map[&format!("{kind}_f32")].to_f64_vec("fp8", kind).unwrap();
        assert_eq!(raw.data.len(), 256);
        for (byte, w) in raw.data.iter().zip(&want) {
            let got = f8_to_f32(*byte, raw.dtype).unwrap() as f64;
            assert!(
                got == *w || (got.is_nan() && w.is_nan()),
                "{kind} byte {byte:#04x}: {got} vs PyTorch {w}"
            );
        }
    }
}

/// An fp8 single-file checkpoint (as ComfyUI users save them) loads as exactly the bf16 model of
/// its decoded values: the same UNet output, bit for bit, in both float8 formats.
#[test]
fn fp8_single_file_loads_as_its_bf16_values() {
    use kstyle::formats::raw::{f8_to_f32, write_safetensors};
    use kstyle::formats::{MappedFile, RawTensor, TensorMap};
    use safetensors::Dtype;
    let src = MappedFile::open(tiny("sdxl_single_file.safetensors")).unwrap();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fp8-single-file");
    std::fs::create_dir_all(&dir).unwrap();
    // e4m3fn's positive values ascend with the byte up to 0x7e (448); e5m2 is the top byte of
    // an f16.
    let e4m3: Vec<f32> = (0..=0x7eu8)
        .map(|b| f8_to_f32(b, Dtype::F8_E4M3).unwrap())
        .collect();
    let encode = |v: f32, kind: Dtype| -> u8 {
        match kind {
            Dtype::F8_E5M2 => (half::f16::from_f32(v).to_bits() >> 8) as u8,
            _ => {
                let a = v.abs().min(448.0);
                let i = e4m3.partition_point(|&d| d < a).min(0x7e);
                let i = if i > 0 && a - e4m3[i - 1] <= e4m3[i] - a {
                    i - 1
                } else {
                    i
                };
                (i as u8) | if v < 0.0 { 0x80 } else { 0 }
            }
        }
    };
    let cfg = tiny_config();
    let mut outputs = Vec::new();
    for kind in [Dtype::F8_E4M3, Dtype::F8_E5M2] {
        let mut f8_map = TensorMap::new();
        let mut bf16_map = TensorMap::new();
        for (name, t) in src.tensors().unwrap().iter() {
            if !matches!(t.dtype, Dtype::F16 | Dtype::F32 | Dtype::BF16) {
                f8_map.insert(name.clone(), t.clone());
                bf16_map.insert(name.clone(), t.clone());
                continue;
            }
            let values = t.to_f64_vec("fp8", name).unwrap();
            let bytes: Vec<u8> = values.iter().map(|&v| encode(v as f32, kind)).collect();
            let decoded: Vec<f64> = bytes
                .iter()
                .map(|&b| f8_to_f32(b, kind).unwrap() as f64)
                .collect();
            f8_map.insert(
                name.clone(),
                RawTensor::new(kind, t.shape.clone(), bytes).unwrap(),
            );
            bf16_map.insert(
                name.clone(),
                RawTensor::from_f64(Dtype::BF16, t.shape.clone(), &decoded).unwrap(),
            );
        }
        let (p8, p16) = (dir.join("fp8.safetensors"), dir.join("bf16.safetensors"));
        write_safetensors(&p8, &f8_map, None).unwrap();
        write_safetensors(&p16, &bf16_map, None).unwrap();
        let load = |p: &PathBuf| {
            UNet2DConditionModel::from_single_file(p, &cfg, &[], DType::BF16, Device::Cpu)
                .unwrap()
                .model
        };
        let (a, b) = (load(&p8), load(&p16));
        let x = randn(&[1, 4, 8, 8], 1).to_dtype(DType::BF16).unwrap();
        let t = Tensor::from_vec(vec![500f32], 1, Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let ctx = randn(&[1, 77, 64], 2).to_dtype(DType::BF16).unwrap();
        let pooled = randn(&[1, 32], 3).to_dtype(DType::BF16).unwrap();
        let ids = randn(&[1, 6], 4).to_dtype(DType::BF16).unwrap();
        let run = |u: &UNet2DConditionModel| {
            no_grad(|| u.forward(&x, &t, &ctx, &pooled, &ids))
                .unwrap()
                .to_vec_f32()
                .unwrap()
        };
        let (oa, ob) = (run(&a), run(&b));
        assert!(oa.iter().all(|v| v.is_finite()), "{kind:?}");
        assert_eq!(oa, ob, "{kind:?}");
        outputs.push(oa);
    }
    // The two formats round differently, so the models differ: the check sees the weights.
    assert_ne!(outputs[0], outputs[1]);
    std::fs::remove_dir_all(&dir).unwrap();
}
