//! Samplers beyond the fixtures' Euler run, against diffusers in float64
//! (`tests/fixtures/extra/gen_samplers.py`, the `samplers` case of `kstyle verify`): DPM++ 2M
//! on the model's spacing and on Karras sigmas (midpoint and heun), DPM-Solver++ of orders 1 and
//! 3, DDIM, Euler on Karras sigmas, and UniPC (order 2; order 3 on Karras sigmas; order 3 with a
//! corrector disabled), LCM at guidance 1 (no negative batch) and Heun; the whole denoising loop
//! over the tiny UNet from the reference's own latents. The newer references (DPM-Solver++
//! heun and orders 1 and 3, UniPC, LCM, Heun, v-prediction) run as `--sampler auto` on the scheduler
//! config diffusers saved with each, as do LMS, DPM2 (Karras, v-prediction), DPM2 ancestral (also
//! Karras on `linspace` spacing), DPM++ SDE (Karras), DEIS (orders 2 and 3, Karras) and Euler on
//! `linspace` spacing.
//!
//! Measured: DPM++ 2M 8.5e-7 and Karras 8.3e-7 relative, heun 8.5e-7, order 1 9.7e-7, DPM++ 3M
//! 9.1e-7, UniPC 7.8e-7, order 3 Karras 1.3e-6, with a corrector skipped 8.1e-7, Euler Karras
//! 1.0e-6; replaying PyTorch's noise, Euler ancestral 1.2e-6, DPM++ 2M SDE Karras 1.2e-6 and
//! DPM++ 3M SDE Karras 1.1e-6, LCM 2.8e-7, Heun 6.1e-7 and Heun Karras 6.2e-7. v-prediction: DPM++ 2M Karras 1.8e-6; with zero
//! terminal SNR (trailing spacing), DDIM 1.7e-6, UniPC 1.2e-6 (guidance_rescale 0.7), Euler
//! 3.1e-5 (guidance_rescale 0.7) and Euler ancestral 9.5e-6, where PyTorch itself in float32
//! lands at 2.1e-5 and 4.6e-6: the first sigma is 4096, so the first Euler step cancels about 9
//! bits of the float32 latents. DDIM 5.4e-5, where PyTorch itself in
//! float32 lands at 3.5e-5 against the same float64 reference (the folder's config leaves DDIM's
//! `clip_sample` on, so the final latents are clamped x0 with a norm near 1, and the UNet's
//! float32 error shows undiluted). LMS 8.9e-7, Karras 9.3e-7; DPM2 8.1e-7, Karras 8.3e-7,
//! v-prediction 1.5e-6; DPM2 a 9.3e-7, Karras on linspace 8.7e-7; DPM++ SDE 7.9e-7, Karras
//! 8.4e-7; Euler on linspace 1.1e-6 (2.6e-4 with the timesteps rounded, as before); DEIS 8.4e-7,
//! order 3 8.8e-7, Karras 9.5e-7 (NaN with DPM's final sigma of 0); singlestep DPM++ 2S 9.8e-7,
//! Karras 9.9e-7, SDE Karras 1.4e-6, 3S 9.4e-7, 3S heun 8.8e-7 (0.55 on the config's spacing
//! instead of linspace, 0.19 with heun's D2 term negated); TCD at gamma 0.3 1.4e-6, at 0 1.1e-6,
//! v-prediction at 0.5 1.9e-6 (8.5e-4 to 1.6e-2 when the last step returns x0); DDIM at eta 0.5
//! 1.6e-5 (clamped x0 again; 0.33 with std^2 left in the direction term). The exponential and
//! beta ramps: Euler 1.1e-6 and 6.2e-7, DPM++ 2M 1.1e-6 and 1.4e-6, 2S exponential 1.3e-6, UniPC
//! beta 1.0e-6, DEIS beta 7.9e-7, Heun beta 4.9e-7, LMS exponential 1.1e-6, DPM2 beta 6.3e-7,
//! DPM2 a exponential 1.1e-6, DPM++ SDE beta 5.6e-7; Euler with final_sigmas_type sigma_min
//! 9.4e-7, Euler Karras between a config's sigma_min and sigma_max 9.6e-7, UniPC exponential
//! between them 9.8e-7. All within the fixtures' 1e-4 forward
//! tolerance.

mod common;

use common::tiny;
use kstyle::sample::pipeline::{SamplerKind, Sigmas};
use kstyle::sample::ramps::Ramp;
use kstyle::Device;

#[test]
fn every_sampler_final_latents_match_diffusers() {
    let report =
        kstyle::verify::run(&tiny(), Device::Cpu, Some(&["samplers".to_string()])).unwrap();
    assert!(report.failed_cases.is_empty(), "{:?}", report.failed_cases);
    assert_eq!(report.rows.len(), 58);
    for r in &report.rows {
        eprintln!("{}: relative error {:.3e}", r.tensor, r.error);
        assert!(r.passed, "{} {:e} > {:e}", r.tensor, r.error, r.tolerance);
    }
}

/// diffusers' SDXL img2img pipeline, per sampler (`tests/fixtures/extra/gen_img2img.py`): the
/// processor's Lanczos resize of a 100x75 image (exact), the VAE's sampled latents (3.1e-7),
/// each sampler's `add_noise` at the strength's first step (5e-8 to 1.2e-7) and the final
/// latents (3.1e-7 to 2.0e-6), with multistep warm-ups and Heun's interleaving starting mid-way;
/// LMS started at step 3 pairs its one slope with order 4's leading coefficient, as diffusers
/// does (1.1e-1 off when it warms up from order 1 instead), DPM2 a and DPM++ SDE Karras start on
/// a first evaluation (1.3e-6 and 1.1e-6), DPM++ 3S starts inside its order cycle (6.6e-7) and
/// TCD at gamma 0.3 part-way down the distillation schedule (1.0e-6).
#[test]
fn img2img_matches_diffusers_for_every_sampler_kind() {
    let report = kstyle::verify::run(&tiny(), Device::Cpu, Some(&["img2img".to_string()])).unwrap();
    assert!(report.failed_cases.is_empty(), "{:?}", report.failed_cases);
    assert_eq!(report.rows.len(), 32);
    for r in &report.rows {
        eprintln!("{}: relative error {:.3e}", r.tensor, r.error);
        assert!(r.passed, "{} {:e} > {:e}", r.tensor, r.error, r.tolerance);
    }
}

/// diffusers' SDXL inpainting pipeline (`tests/fixtures/extra/gen_inpaint.py`): the mask
/// processor's Lanczos, "L" and binarisation (exact), and the final latents of 4-channel runs
/// blending the kept region back every step (Euler at 0.6 and 1.0, Euler ancestral, DDIM, DPM++
/// 2M, Heun: 7.4e-7 to 1.9e-6) and of a 9-channel inpainting UNet (Euler at 0.9999, DPM++ 2M at
/// 1: 7.8e-7 and 7.7e-7).
#[test]
fn inpainting_matches_diffusers_with_both_unet_kinds() {
    let report = kstyle::verify::run(&tiny(), Device::Cpu, Some(&["inpaint".to_string()])).unwrap();
    assert!(report.failed_cases.is_empty(), "{:?}", report.failed_cases);
    assert_eq!(report.rows.len(), 9);
    for r in &report.rows {
        eprintln!("{}: relative error {:.3e}", r.tensor, r.error);
        assert!(r.passed, "{} {:e} > {:e}", r.tensor, r.error, r.tolerance);
    }
}

/// SDXL's base + refiner handover (`tests/fixtures/extra/gen_refiner.py`): the base's latents
/// at `denoising_end` (6.5e-7 to 9.4e-7), the tiny refiner's conditioning (text_encoder_2 alone,
/// "" encoded for the negative, five time ids with aesthetic scores 6 and 2.5: exact to 2.5e-7)
/// and the final latents after `denoising_start` with Euler, DPM++ 2M, Heun (an odd evaluation
/// count) and the base as its own second expert (6.7e-7 to 9.4e-7).
#[test]
fn base_and_refiner_hand_over_as_diffusers_does() {
    let report = kstyle::verify::run(&tiny(), Device::Cpu, Some(&["refiner".to_string()])).unwrap();
    assert!(report.failed_cases.is_empty(), "{:?}", report.failed_cases);
    assert_eq!(report.rows.len(), 11);
    for r in &report.rows {
        eprintln!("{}: relative error {:.3e}", r.tensor, r.error);
        assert!(r.passed, "{} {:e} > {:e}", r.tensor, r.error, r.tolerance);
    }
}

/// The steps an img2img strength runs, as diffusers' `get_timesteps` counts them in double.
#[test]
fn img2img_strength_counts_steps_as_diffusers() {
    use kstyle::sample::pipeline::skipped_steps;
    // 6 x 0.6 is 3.5999999999999996 in double: 3 run, 3 skipped.
    assert_eq!(skipped_steps(6, 0.6).unwrap(), 3);
    assert_eq!(skipped_steps(4, 1.0).unwrap(), 0);
    assert_eq!(skipped_steps(5, 0.6).unwrap(), 2);
    assert_eq!(skipped_steps(30, 0.3).unwrap(), 21);
    assert_eq!(skipped_steps(10, 0.1).unwrap(), 9);
    for (steps, strength) in [(10, 0.05), (4, 0.0), (4, -0.5), (4, 1.01), (4, f64::NAN)] {
        assert!(
            skipped_steps(steps, strength).is_err(),
            "{steps} steps at strength {strength}"
        );
    }
}

/// `--sampler auto` runs the folder's scheduler class; DPM settings this crate does not
/// implement, and scheduler classes it has no sampler for, are refused by name.
#[test]
fn auto_sampler_follows_the_scheduler_config() {
    use kstyle::sample::{DpmSolverPP, SchedulerConfig, UniPc};
    let dir = common::tmp("scheduler-configs");
    let config = |json: &str| {
        let p = dir.join("scheduler_config.json");
        std::fs::write(&p, json).unwrap();
        SchedulerConfig::from_file(&p)
    };
    let dpm =
        config(r#"{"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": true}"#)
            .unwrap();
    assert_eq!(
        SamplerKind::Auto.resolve(&dpm).unwrap(),
        SamplerKind::DpmPP {
            order: 2,
            sde: false,
            sigmas: Sigmas::Config
        }
    );
    assert_eq!(dpm.ramp, Ramp::Karras);
    // The other two ramps, one at a time (diffusers refuses two), and how runs describe them.
    let beta = config(r#"{"_class_name": "DPMSolverMultistepScheduler", "use_beta_sigmas": true}"#)
        .unwrap();
    assert_eq!(beta.ramp, Ramp::Beta);
    assert_eq!(
        SamplerKind::Auto.resolve(&beta).unwrap().describe(&beta),
        "DPM++ 2M beta"
    );
    let exp = config(r#"{"use_exponential_sigmas": true}"#).unwrap();
    assert_eq!(exp.ramp, Ramp::Exponential);
    assert_eq!(
        SamplerKind::Auto.resolve(&exp).unwrap().describe(&exp),
        "Euler exponential"
    );
    let two = config(r#"{"use_karras_sigmas": true, "use_beta_sigmas": true}"#).unwrap_err();
    assert!(two.to_string().contains("only one sigma ramp"), "{two}");
    // Settings nothing here implements are refused by name, never run as something else.
    for (json, named) in [
        (r#"{"trained_betas": [0.1, 0.2]}"#, "trained_betas"),
        (
            r#"{"final_sigmas_type": "last"}"#,
            "final_sigmas_type `last`",
        ),
    ] {
        let err = config(json).unwrap_err().to_string();
        assert!(err.contains(named), "{err}");
    }
    use kstyle::sample::{EulerDiscrete, Heun};
    let continuous = config(r#"{"timestep_type": "continuous"}"#).unwrap();
    let err = EulerDiscrete::new(&continuous, 5)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("continuous"), "{err}");
    // Euler's own settings stay Euler's: Heun, built on Euler's schedule, runs to sigma 0 and
    // ignores sigma_max, as HeunDiscreteScheduler.from_config drops both.
    let own = config(
        r#"{"final_sigmas_type": "sigma_min", "use_karras_sigmas": true, "sigma_max": 5.0}"#,
    )
    .unwrap();
    let euler = EulerDiscrete::new(&own, 5).unwrap();
    let (last, first) = (euler.sigmas()[5], euler.sigmas()[0]);
    assert!(
        last > 0.02 && last < 0.04 && (first - 5.0).abs() < 1e-6,
        "{:?}",
        euler.sigmas()
    );
    let heun = Heun::new(&own, 5).unwrap();
    assert_eq!(heun.sigmas().last(), Some(&0.0));
    assert!(heun.sigmas()[0] > 14.0, "{:?}", heun.sigmas());
    assert!(Heun::new(&continuous, 5).is_ok());
    // --sigmas on a resolved sampler: a ramp for those with sigmas, an error for the others and
    // for a -karras name asked for another ramp.
    let euler = SamplerKind::Euler(Sigmas::Config);
    assert_eq!(
        euler.with_sigmas(Sigmas::Beta, &ddim_free()).unwrap(),
        SamplerKind::Euler(Sigmas::Beta)
    );
    for (kind, why) in [
        (SamplerKind::EulerAncestral, "no choice of sigmas"),
        (SamplerKind::Euler(Sigmas::Karras), "-karras name"),
    ] {
        let err = kind
            .with_sigmas(Sigmas::Exponential, &ddim_free())
            .unwrap_err();
        assert!(err.to_string().contains(why), "{err}");
    }
    let ddim = config(r#"{"_class_name": "DDIMScheduler"}"#).unwrap();
    assert_eq!(
        SamplerKind::Auto.resolve(&ddim).unwrap(),
        SamplerKind::Ddim { eta: 0.0 }
    );
    assert_eq!(
        SamplerKind::Euler(Sigmas::Config).resolve(&ddim).unwrap(),
        SamplerKind::Euler(Sigmas::Config)
    );
    let pndm = config(r#"{"_class_name": "PNDMScheduler"}"#).unwrap();
    let err = SamplerKind::Auto.resolve(&pndm).unwrap_err().to_string();
    assert!(
        err.contains("PNDMScheduler") && err.contains("--sampler"),
        "{err}"
    );
    // The k-diffusion classes resolve to their samplers; none of them has a zero-SNR schedule.
    for (class, kind, named) in [
        (
            "LMSDiscreteScheduler",
            SamplerKind::Lms(Sigmas::Config),
            "LMS",
        ),
        (
            "KDPM2DiscreteScheduler",
            SamplerKind::Dpm2 {
                ancestral: false,
                sigmas: Sigmas::Config,
            },
            "DPM2",
        ),
        (
            "KDPM2AncestralDiscreteScheduler",
            SamplerKind::Dpm2 {
                ancestral: true,
                sigmas: Sigmas::Config,
            },
            "DPM2 a Karras",
        ),
        (
            "DPMSolverSDEScheduler",
            SamplerKind::DpmPPSde(Sigmas::Config),
            "DPM++ SDE",
        ),
    ] {
        let karras = named.ends_with("Karras");
        let cfg = config(&format!(
            r#"{{"_class_name": "{class}", "use_karras_sigmas": {karras}}}"#
        ))
        .unwrap();
        assert_eq!(SamplerKind::Auto.resolve(&cfg).unwrap(), kind, "{class}");
        assert_eq!(kind.describe(&cfg), named);
        let zsnr = config(&format!(
            r#"{{"_class_name": "{class}", "rescale_betas_zero_snr": true}}"#
        ))
        .unwrap();
        use kstyle::sample::{DpmPPSde, Kdpm2, Lms, Noise};
        let err = match kind {
            SamplerKind::Lms(_) => Lms::new(&zsnr, 10).err(),
            SamplerKind::Dpm2 { ancestral, .. } => {
                Kdpm2::new(&zsnr, 10, ancestral.then_some(&Noise::default())).err()
            }
            _ => DpmPPSde::new(&zsnr, 10, &Noise::default()).err(),
        }
        .unwrap()
        .to_string();
        assert!(err.contains("rescale_betas_zero_snr"), "{class}: {err}");
    }
    let deis = config(r#"{"_class_name": "DEISMultistepScheduler", "solver_order": 3}"#).unwrap();
    let kind = SamplerKind::Auto.resolve(&deis).unwrap();
    assert_eq!(kind, SamplerKind::Deis(Sigmas::Config));
    assert_eq!(kind.describe(&deis), "DEIS (order 3)");
    let deis_zsnr =
        config(r#"{"_class_name": "DEISMultistepScheduler", "rescale_betas_zero_snr": true}"#)
            .unwrap();
    let err = kstyle::sample::Deis::new(&deis_zsnr, 10, Ramp::Spaced)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("rescale_betas_zero_snr"), "{err}");
    // Without `timestep_spacing` (configs older than diffusers 0.16) the class's default applies.
    use kstyle::sample::Spacing;
    assert_eq!(
        config(r#"{"_class_name": "EulerDiscreteScheduler"}"#)
            .unwrap()
            .spacing,
        Spacing::Linspace
    );
    assert_eq!(
        config(r#"{"_class_name": "DDIMScheduler"}"#)
            .unwrap()
            .spacing,
        Spacing::Leading
    );
    assert_eq!(
        config(r#"{"_class_name": "LCMScheduler"}"#)
            .unwrap()
            .spacing,
        Spacing::Leading
    );
    let sde = config(
        r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++", "solver_order": 3}"#,
    )
    .unwrap();
    let three_sde = SamplerKind::DpmPP {
        order: 3,
        sde: true,
        sigmas: Sigmas::Config,
    };
    assert_eq!(SamplerKind::Auto.resolve(&sde).unwrap(), three_sde);
    assert_eq!(three_sde.describe(&sde), "DPM++ 3M SDE");
    let four =
        config(r#"{"_class_name": "DPMSolverMultistepScheduler", "solver_order": 4}"#).unwrap();
    let err = DpmSolverPP::new(&four, 10, 2, Ramp::Spaced)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("solver_order: 4"), "{err}");
    let sde_dpm = config(
        r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver"}"#,
    )
    .unwrap();
    let err = DpmSolverPP::new(&sde_dpm, 10, 2, Ramp::Spaced)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("algorithm_type: sde-dpmsolver"), "{err}");
    let err = config(r#"{"interpolation_type": "log_linear"}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("log_linear"), "{err}");
    // diffusers saves DPM's default lambda_min_clipped as the bare word -Infinity (Python's
    // json.dumps); it reads as the default.
    let saved = config(
        r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
            "solver_type": "heun", "use_karras_sigmas": true}"#,
    )
    .unwrap();
    assert!(saved.dpm_unsupported.is_empty() && saved.dpm_heun);
    assert_eq!(
        SamplerKind::Auto.resolve(&saved).unwrap().describe(&saved),
        "DPM++ 2M (heun) Karras"
    );
    // Impossible schedules are errors naming the key, not index panics.
    let err = config(r#"{"num_train_timesteps": 1}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("num_train_timesteps"), "{err}");
    let far = config(r#"{"_class_name": "DDIMScheduler", "steps_offset": 5000}"#).unwrap();
    let err = kstyle::sample::Ddim::new(&far, 3)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("outside") && err.contains("steps_offset 5000"),
        "{err}"
    );
    // UniPC: auto from its class; the settings diffusers itself turns into NaN are refused.
    let unipc = config(r#"{"_class_name": "UniPCMultistepScheduler", "solver_order": 3}"#).unwrap();
    let kind = SamplerKind::Auto.resolve(&unipc).unwrap();
    assert_eq!(kind, SamplerKind::UniPc(Sigmas::Config));
    assert_eq!(kind.describe(&unipc), "UniPC (bh2, order 3)");
    assert!(UniPc::new(&unipc, 10, Ramp::Spaced).is_ok());
    let heun =
        config(r#"{"_class_name": "HeunDiscreteScheduler", "rescale_betas_zero_snr": true}"#)
            .unwrap();
    assert_eq!(
        SamplerKind::Auto.resolve(&heun).unwrap(),
        SamplerKind::Heun(Sigmas::Config)
    );
    let err = kstyle::sample::Heun::new(&heun, 10)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("rescale_betas_zero_snr"), "{err}");
    let lcm = config(r#"{"_class_name": "LCMScheduler", "original_inference_steps": 8}"#).unwrap();
    assert_eq!(SamplerKind::Auto.resolve(&lcm).unwrap(), SamplerKind::Lcm);
    let err = kstyle::sample::Lcm::new(&lcm, 9, &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("1 to 8 steps"), "{err}");
    for (json, named) in [
        (r#"{"solver_type": "bh1"}"#, "bh1"),
        (r#"{"predict_x0": false}"#, "predict_x0 false"),
        (
            r#"{"final_sigmas_type": "sigma_min"}"#,
            "final_sigmas_type: sigma_min",
        ),
    ] {
        let err = UniPc::new(&config(json).unwrap(), 10, Ramp::Spaced)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(named), "{json}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Zero terminal SNR: the rescaled table, read exactly as diffusers' Euler holds it (its last
/// alpha_cumprod 2^-24, so the first trailing sigma is 4096), against the reference's sigmas.
#[test]
fn zero_snr_sigmas_match_diffusers() {
    use kstyle::sample::{EulerDiscrete, SchedulerConfig};
    use kstyle::tensor::SafeTensorsFile;
    let path = tiny().join("../extra/pipeline_vpred_euler_zsnr.safetensors");
    let f = SafeTensorsFile::open(&path).unwrap();
    let config = SchedulerConfig::from_json_text(&f.metadata()["scheduler_config"], &path).unwrap();
    assert!(config.zero_snr);
    assert_eq!(*config.alphas_cumprod_f32().last().unwrap(), 0.0);
    let euler = EulerDiscrete::new(&config, 6).unwrap();
    let want = f.tensor("sigmas").unwrap().to_vec_f64().unwrap();
    assert_eq!(euler.sigmas().len(), want.len());
    // Within 1e-6 relative, as for the other sigma tables: PyTorch's float32 sqrt on this AVX-512
    // CPU is not correctly rounded (1 ulp off for about 20% of random inputs, measured against
    // numpy's), and the rescale takes square roots of the whole table before its ratios and
    // cumulative product. Here sqrt is IEEE's: sqrt(2^24 - 1), just under a tie, is 4096 - 2^-12
    // here and 4096 there; further down the table the sigmas differ by up to 4 ulps.
    for (g, w) in euler.sigmas().iter().zip(&want) {
        assert!((g - w).abs() <= 1e-6 * w.abs(), "{g} vs {w}");
    }
    assert!((euler.sigmas()[0] - 4096.0).abs() <= 2.5e-4);
}

/// `verify --case` and `--skip` take only real case names: a misspelt one would select nothing
/// and pass.
#[test]
fn verify_refuses_unknown_case_names() {
    for flag in ["--case", "--skip"] {
        let o = common::kstyle(&["verify", tiny().to_str().unwrap(), flag, "sampler"]);
        let err = common::stderr(&o);
        assert!(
            !o.status.success() && err.contains("`sampler`") && err.contains("samplers"),
            "{err}"
        );
    }
}

/// The default scheduler config (the tiny model's kind: Euler, leading spacing).
fn ddim_free() -> kstyle::sample::SchedulerConfig {
    kstyle::sample::SchedulerConfig::default()
}

/// The timesteps the UNet sees under LMS, DPM2 (a), DPM++ SDE, Heun, Euler on `linspace`
/// spacing and every sampler on the exponential and beta ramps, against diffusers' own (stored
/// as float32): the interleaved midpoints of the two-evaluation samplers, Karras rounding,
/// fractional `linspace` and ramp timesteps, the multistep classes' truncation of ramp timesteps.
#[test]
fn k_diffusion_timesteps_match_diffusers() {
    use kstyle::sample::{
        Deis, DpmPPSde, DpmSolverPP, DpmSolverSinglestep, EulerDiscrete, Heun, Kdpm2, Lms, Noise,
        Sampler, SchedulerClass, SchedulerConfig, UniPc,
    };
    use kstyle::tensor::SafeTensorsFile;
    let noise = Noise::default();
    for name in [
        "lms",
        "lms_karras",
        "kdpm2",
        "kdpm2_karras",
        "kdpm2_a",
        "dpmpp_sde",
        "dpmpp_sde_karras",
        "euler_linspace",
        "dpm2_a_karras_linspace",
        "euler_exponential",
        "euler_beta",
        "dpmpp_2m_exponential",
        "dpmpp_2m_beta",
        "dpmpp_2s_exponential",
        "unipc_beta",
        "deis_beta",
        "heun_beta",
        "lms_exponential",
        "kdpm2_beta",
        "kdpm2_a_exponential",
        "dpmpp_sde_beta",
        "euler_final_sigma_min",
        "euler_karras_range",
        "unipc_exponential_range",
    ] {
        let path = tiny().join(format!("../extra/pipeline_{name}.safetensors"));
        let f = SafeTensorsFile::open(&path).unwrap();
        let config =
            SchedulerConfig::from_json_text(&f.metadata()["scheduler_config"], &path).unwrap();
        let steps: usize = f.metadata()["steps"].parse().unwrap();
        let sampler: Box<dyn Sampler> = match config.class {
            SchedulerClass::LmsDiscrete => Box::new(Lms::new(&config, steps).unwrap()),
            SchedulerClass::Kdpm2Discrete => Box::new(Kdpm2::new(&config, steps, None).unwrap()),
            SchedulerClass::Kdpm2AncestralDiscrete => {
                Box::new(Kdpm2::new(&config, steps, Some(&noise)).unwrap())
            }
            SchedulerClass::DpmSolverSde => {
                Box::new(DpmPPSde::new(&config, steps, &noise).unwrap())
            }
            SchedulerClass::EulerDiscrete => Box::new(EulerDiscrete::new(&config, steps).unwrap()),
            SchedulerClass::HeunDiscrete => Box::new(Heun::new(&config, steps).unwrap()),
            SchedulerClass::DpmSolverMultistep => Box::new(
                DpmSolverPP::new(&config, steps, config.solver_order, config.ramp).unwrap(),
            ),
            SchedulerClass::DpmSolverSinglestep => Box::new(
                DpmSolverSinglestep::new(&config, steps, config.solver_order, config.ramp, None)
                    .unwrap(),
            ),
            SchedulerClass::UniPcMultistep => {
                Box::new(UniPc::new(&config, steps, config.ramp).unwrap())
            }
            SchedulerClass::DeisMultistep => {
                Box::new(Deis::new(&config, steps, config.ramp).unwrap())
            }
            ref other => panic!("{name}: {other:?}"),
        };
        let want = f.tensor("timesteps").unwrap().to_vec_f64().unwrap();
        let got: Vec<f64> = sampler
            .timesteps()
            .iter()
            .map(|&t| t as f32 as f64)
            .collect();
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // Within 1e-6 relative, as the sigma tables: fractional timesteps interpolate the
            // float32 log-sigma table, and PyTorch's float32 sqrt and log on the reference machine
            // are not correctly rounded (its sigma(167) is 1 ulp below IEEE's sqrt, its
            // log(2.9071) 1 ulp above), which moves a timestep by up to 7e-7 relative (DPM2 a's
            // midpoints chain five such operations). A wrong midpoint or ramp moves it by units.
            let tol = 1e-6 * w.abs().max(10.0);
            assert!((g - w).abs() <= tol, "{name} timestep {i}: {g} vs {w}");
        }
    }
}

/// EDM models against diffusers (`tests/fixtures/extra/gen_edm.py`, the `edm` case of `kstyle
/// verify`): `EDMDPMSolverMultistepScheduler` with Playground v2.5's config (3.3e-6), as SDE
/// replaying PyTorch's noise (3.1e-6), of order 3 (6.0e-6), heun on exponential sigmas (2.8e-6);
/// `EDMEulerScheduler` (2.3e-6) and as v-prediction with sigma_data 1 (2.2e-6); img2img from
/// latents (start 4.4e-8, final 1.9e-6). Playground's built-in config is diffusers' own, and what
/// the EDM classes cannot do is refused by name.
#[test]
fn edm_models_match_diffusers() {
    use kstyle::sample::{DpmSolverPP, SchedulerConfig};
    use kstyle::tensor::SafeTensorsFile;
    let report = kstyle::verify::run(&tiny(), Device::Cpu, Some(&["edm".to_string()])).unwrap();
    assert!(report.failed_cases.is_empty(), "{:?}", report.failed_cases);
    assert_eq!(report.rows.len(), 8);
    for r in &report.rows {
        eprintln!("{}: relative error {:.3e}", r.tensor, r.error);
        assert!(r.passed, "{} {:e} > {:e}", r.tensor, r.error, r.tolerance);
    }
    let path = tiny().join("../extra/edm.safetensors");
    let f = SafeTensorsFile::open(&path).unwrap();
    let saved =
        SchedulerConfig::from_json_text(&f.metadata()["dpmpp_2m.scheduler_config"], &path).unwrap();
    let builtin = SchedulerConfig::from_json_text(
        kstyle::sample::edm::PLAYGROUND_SCHEDULER,
        std::path::Path::new("playground"),
    )
    .unwrap();
    assert_eq!(saved, builtin);
    // The timesteps the UNet sees (log(sigma) / 4 of the float32 sigmas; the DPM ramp in float32,
    // Euler's in float64), within float32 rounding of PyTorch's pow and log.
    for case in [
        "dpmpp_2m",
        "dpmpp_2m_heun_exponential",
        "euler",
        "vpred_euler",
    ] {
        use kstyle::sample::{EdmEuler, Sampler};
        let cfg = SchedulerConfig::from_json_text(
            &f.metadata()[&format!("{case}.scheduler_config")],
            &path,
        )
        .unwrap();
        let sampler: Box<dyn Sampler> = match case.contains("euler") {
            true => Box::new(EdmEuler::new(cfg.edm.unwrap(), cfg.prediction, 6).unwrap()),
            false => Box::new(DpmSolverPP::new(&cfg, 6, 2, Ramp::Spaced).unwrap()),
        };
        let want = f
            .tensor(&format!("{case}.timesteps"))
            .unwrap()
            .to_vec_f64()
            .unwrap();
        assert_eq!(sampler.timesteps().len(), want.len());
        for (g, w) in sampler.timesteps().iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{case}: {g} vs {w}"
            );
        }
    }
    assert_eq!(
        SamplerKind::Auto
            .resolve(&builtin)
            .unwrap()
            .describe(&builtin),
        "DPM++ 2M Karras (EDM)"
    );
    // diffusers' EDM scheduler has no third-order SDE step (it fails on an unbound variable).
    let err = DpmSolverPP::with_noise(&builtin, 6, 3, Ramp::Spaced, Some(&Default::default()))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("third-order SDE"), "{err}");
    // Samplers without an EDM form are refused, not run on a beta schedule the model never saw.
    let dir = common::tmp("edm-configs");
    let out = dir.join("x.png");
    let o = common::generate_model(
        &common::edm_folder(&dir),
        "2",
        &["--sampler", "heun", "--out", out.to_str().unwrap()],
    );
    common::assert_fails_naming(&o, "not implemented for EDM models");
    assert!(!out.exists());
    let p = dir.join("scheduler_config.json");
    std::fs::write(
        &p,
        r#"{"_class_name": "EDMEulerScheduler", "sigma_min": 5.0, "sigma_max": 1.0}"#,
    )
    .unwrap();
    let err = SchedulerConfig::from_file(&p).unwrap_err().to_string();
    assert!(err.contains("sigma_min < sigma_max"), "{err}");
    // Training draws EDM sigmas, not DDPM timesteps: the 1001-point ramp from sigma_max down to
    // sigma_min, indices below num_train_timesteps.
    let train = kstyle::sample::TrainSchedule::for_model(&builtin).unwrap();
    let edm = train.edm.as_ref().expect("an EDM training schedule");
    assert!(train.alphas_cumprod.is_empty());
    assert_eq!((train.len(), edm.sigmas.len()), (1000, 1001));
    assert_eq!((edm.sigmas[0], edm.sigmas[1000]), (80.0, 0.002));
    std::fs::remove_dir_all(&dir).unwrap();
}
