//! `kstyle train --dora-wd`: DoRA (LyCORIS' weight-decomposed LoRA). The arithmetic of a step is
//! checked against lycoris-lora's LoConModule by the `train_dora` verify case; here, through the
//! real binary on the tiny model: the adapter holds a `dora_scale` beside every module's factors
//! in LyCORIS' layout, runs live as its kohya export runs merged (at strength 1 and 0.5) and
//! as its diffusers/PEFT export (lora_magnitude_vector) at strength 1, resumes
//! bit for bit, trains in mixed precision, and what DoRA cannot do is refused.

mod common;
use common::train::{
    assert_resume_is_exact, dataset, refused, resume_with, setting, train, train_ok,
};
use common::{assert_fails_naming, export_tiny, rel_l2, tiny_unet, tiny_unet_output, tmp};
use kstyle::formats::adapter::Adapter;
use kstyle::models::unet::KohyaLoraFile;
use kstyle::sample::pipeline::unet_module_index;
use kstyle::tensor::SafeTensorsFile;
use kstyle::{DType, Device};

/// Two steps at lr 1e-2 with the conv group and `--dora-wd` plus `extra` into `out`.
fn train_dora_adapter(data: &std::path::Path, out: &std::path::Path, extra: &[&str]) {
    let args = [
        &[
            "--max-steps",
            "2",
            "--lr",
            "1e-2",
            "--conv-dim",
            "2",
            "--dora-wd",
        ][..],
        extra,
    ]
    .concat();
    train_ok(data, out, "lora", &args);
}

/// `adapter` with every magnitude scaled by 1.25, saved as `out`. Two steps move the magnitudes
/// little from the norms they track: scaled, every row's rescale is material, so a merge that
/// ignored dora_scale could not match.
fn scaled_magnitudes(adapter: &std::path::Path, out: &std::path::Path) {
    let index = unet_module_index(&tiny_unet(&[]));
    let mut ad = Adapter::load(adapter, &index, Device::Cpu).unwrap();
    for (_, a) in &mut ad.modules {
        let d = a.dora.as_mut().unwrap();
        d.magnitude = d.magnitude.scale(1.25).unwrap();
    }
    ad.save(out, &index).unwrap();
}

/// The tiny UNet's output with `adapter` attached live at `strength`, as generate attaches it.
fn live_output(adapter: &std::path::Path, strength: f64) -> kstyle::Tensor {
    let mut live = tiny_unet(&[]);
    let ad = Adapter::load(adapter, &unet_module_index(&live), Device::Cpu).unwrap();
    let mut by_path: std::collections::HashMap<_, _> = ad.modules.into_iter().collect();
    live.attach_all(|p| {
        by_path
            .remove(p)
            .map(|a| a.frozen(DType::F32, strength))
            .transpose()
    })
    .unwrap();
    assert!(by_path.is_empty());
    tiny_unet_output(&live)
}

#[test]
fn dora_trains_in_lycoris_names_and_runs_as_its_export() {
    let dir = tmp("dora");
    let data = dataset(&dir);
    let adapter = dir.join("dora/adapter.safetensors");
    train_dora_adapter(&data, &adapter, &[]);
    assert_eq!(setting(&adapter, "dora_wd"), "true");
    let f = SafeTensorsFile::open(&adapter).unwrap();
    let meta = f.metadata();
    assert_eq!(meta["ss_network_module"], "lycoris.kohya");
    assert!(meta["ss_network_args"].contains("dora_wd"), "{meta:?}");
    let modules: Vec<String> = f
        .names()
        .filter_map(|n| n.strip_suffix(".lora_down.weight"))
        .map(String::from)
        .collect();
    assert_eq!(modules.len(), 22 * 2 * 4 + 66);
    for m in &modules {
        let up = f.info(&format!("{m}.lora_up.weight")).unwrap().1.to_vec();
        let scale = f.info(&format!("{m}.dora_scale")).unwrap().1.to_vec();
        let mut want = vec![1; up.len()];
        want[0] = up[0];
        assert_eq!(scale, want, "{m}");
    }

    let scaled = dir.join("dora/scaled.safetensors");
    scaled_magnitudes(&adapter, &scaled);
    let adapter = scaled;

    // Live (attached as generate attaches it) against the kohya export merged at load, at full
    // and half strength (ComfyUI's DoRA at strength s: W + s (W' - W)).
    let file = dir.join("kohya.safetensors");
    let o = export_tiny(&adapter, "kohya", &file);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(SafeTensorsFile::open(&file)
        .unwrap()
        .names()
        .any(|n| n.ends_with(".dora_scale")));
    let mut y_live_full = None;
    for strength in [1.0, 0.5] {
        let y_live = live_output(&adapter, strength);
        let merged = tiny_unet(&[KohyaLoraFile::new(&file, strength)]);
        let r = rel_l2(&tiny_unet_output(&merged), &y_live);
        assert!(
            r < 1e-5,
            "strength {strength}: export merged differs from live: {r}"
        );
        if strength == 1.0 {
            let plain = tiny_unet_output(&tiny_unet(&[]));
            assert!(rel_l2(&plain, &y_live) > 1e-2, "DoRA changed nothing");
            y_live_full = Some(y_live);
        }
    }
    let y_live_full = y_live_full.unwrap();
    // The diffusers/PEFT export: magnitudes as lora_magnitude_vector in PEFT's shapes, alpha
    // folded into lora_B; merged at strength 1 (PEFT's scaling) it runs as the live adapter.
    let file = dir.join("peft.safetensors");
    let o = export_tiny(&adapter, "diffusers", &file);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let f = SafeTensorsFile::open(&file).unwrap();
    let magnitudes: Vec<_> = f
        .names()
        .filter(|n| n.ends_with(".lora_magnitude_vector.weight"))
        .map(|n| f.info(n).unwrap().1.to_vec())
        .collect();
    assert_eq!(magnitudes.len(), modules.len());
    let convs = magnitudes.iter().filter(|s| s.len() == 4).count();
    assert!(convs > 0 && magnitudes.iter().all(|s| s.len() == 1 || s[0] == 1));
    let merged = tiny_unet(&[KohyaLoraFile::new(&file, 1.0)]);
    let r = rel_l2(&tiny_unet_output(&merged), &y_live_full);
    assert!(r < 1e-5, "diffusers export merged differs from live: {r}");
}

#[test]
fn dora_resumes_exactly_and_refuses_what_it_cannot_do() {
    let dir = tmp("dora-resume");
    let data = dataset(&dir);
    // The cultural loss on top, module dropout and text-encoder LoRA (DoRA there too).
    let args = [
        "--dora-wd",
        "--conv-dim",
        "2",
        "--module-dropout",
        "0.3",
        "--train-text-encoder",
        "--batch-size",
        "2",
    ];
    let ckpt = assert_resume_is_exact(&data, &dir.join("resume"), "lora-csl", &args, "DoRA");
    // The same run without --dora-wd.
    let plain: Vec<&str> = args.into_iter().filter(|a| *a != "--dora-wd").collect();
    let out = dir.join("again/a.safetensors");
    let o = resume_with(&data, &out, "lora-csl", &ckpt, &plain);
    assert_fails_naming(&o, "--dora-wd true");

    // Mixed precision: the f32 sum W + dW, the op in bf16.
    train_ok(
        &data,
        &dir.join("bf16/a.safetensors"),
        "lora",
        &["--max-steps", "1", "--dora-wd", "--dtype", "bf16"],
    );

    refused(
        &data,
        &dir,
        &["--dora-wd", "--network-dropout", "0.1"],
        "--module-dropout only",
    );
    refused(
        &data,
        &dir,
        &["--dora-wd", "--scale-weight-norms", "1"],
        "--scale-weight-norms",
    );
    let o = train(
        &data,
        &dir.join("gated.safetensors"),
        "kstyle",
        &["--max-steps", "1", "--dora-wd"],
    );
    assert_fails_naming(&o, "gates LoRA's rank");
}

/// DoHa and DoKr (`--algo loha|lokr --dora-wd`): the adapter holds LyCORIS' factors and a
/// dora_scale on every module, and runs live as its kohya export runs merged (magnitudes scaled by
/// 1.25 first, so a merge that ignored them could not match).
#[test]
fn doha_and_dokr_run_as_their_exports() {
    let dir = tmp("doha");
    let data = dataset(&dir);
    for (algo, factor) in [("loha", "hada_w1_a"), ("lokr", "lokr_w1")] {
        let adapter = dir.join(format!("{algo}/adapter.safetensors"));
        train_dora_adapter(&data, &adapter, &["--algo", algo]);
        let f = SafeTensorsFile::open(&adapter).unwrap();
        assert!(f.metadata()["ss_network_args"].contains("dora_wd"));
        let modules: Vec<&str> = f
            .names()
            .filter_map(|n| n.strip_suffix(&format!(".{factor}")))
            .collect();
        assert_eq!(modules.len(), 22 * 2 * 4 + 66, "{algo}");
        assert!(modules
            .iter()
            .all(|m| f.contains(&format!("{m}.dora_scale"))));

        let scaled = dir.join(format!("{algo}/scaled.safetensors"));
        scaled_magnitudes(&adapter, &scaled);
        let file = dir.join(format!("{algo}/kohya.safetensors"));
        let o = export_tiny(&scaled, "kohya", &file);
        assert!(o.status.success(), "{}", common::stderr(&o));
        let y_live = live_output(&scaled, 1.0);
        let merged = tiny_unet(&[KohyaLoraFile::new(&file, 1.0)]);
        let r = rel_l2(&tiny_unet_output(&merged), &y_live);
        assert!(r < 1e-5, "{algo}: export merged differs from live: {r}");
        let plain = tiny_unet_output(&tiny_unet(&[]));
        assert!(
            rel_l2(&plain, &y_live) > 1e-2,
            "{algo}: DoRA changed nothing"
        );
    }
}
