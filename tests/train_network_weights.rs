//! `kstyle train --network-weights FILE`: a run starts its adapters from an existing LoRA. Through
//! the real binary on the tiny model: at learning rate 0 the run writes back exactly the adapter
//! it started from (LoRA with conv and text-encoder modules, and DoRA); a kohya export read with
//! another --alpha, and a diffusers/PEFT export (alpha folded in), start the run from the same
//! update; a DoRA run from a plain LoRA starts at its output; LoHa and LoKr files start LoHa,
//! LoKr, DoHa and DoKr runs the same ways; what does not fit the run (rank, factor shapes,
//! modules it does not train, another algorithm, DoRA magnitudes without --dora-wd, gated
//! methods, --resume, a damaged file) is refused by name. With --dim-from-weights the run takes
//! the file's modules, ranks and alphas (and LoKr factor shapes) instead of its own.

mod common;
use common::train::{dataset, setting, tensors, train, train_ok};
use common::{assert_fails_naming, export_tiny, rel_l2, tiny_unet, tiny_unet_output, tmp};
use kstyle::models::unet::KohyaLoraFile;
use kstyle::tensor::SafeTensorsFile;
use std::path::Path;

const CONV_TE: [&str; 3] = ["--conv-dim", "2", "--train-text-encoder"];

/// One step at learning rate 0 from `weights` with `args`: the adapter the run writes.
fn frozen_run(data: &Path, out: &Path, weights: &Path, args: &[&str]) -> std::path::PathBuf {
    let base = [
        "--max-steps",
        "1",
        "--lr",
        "0",
        "--network-weights",
        weights.to_str().unwrap(),
    ];
    let text = match args.contains(&"--train-text-encoder") {
        true => &["--text-encoder-lr", "0"][..],
        false => &[],
    };
    train_ok(data, out, "lora", &[&base[..], text, args].concat())
}

/// The tiny UNet's output with `file` merged at strength 1.
fn merged_output(file: &Path) -> kstyle::Tensor {
    tiny_unet_output(&tiny_unet(&[KohyaLoraFile::new(file, 1.0)]))
}

#[test]
fn network_weights_start_the_run_from_the_file() {
    let dir = tmp("network-weights");
    let data = dataset(&dir);
    let trained = [&["--max-steps", "2", "--lr", "1e-2"][..], &CONV_TE[..]].concat();
    let a = train_ok(&data, &dir.join("a/adapter.safetensors"), "lora", &trained);

    // Nothing moves at rate 0: every tensor of the file comes back bit for bit.
    let b = frozen_run(&data, &dir.join("b/b.safetensors"), &a, &CONV_TE);
    assert_eq!(tensors(&b), tensors(&a));
    assert_eq!(setting(&b, "network_weights"), "adapter.safetensors");
    let y = merged_output(&a);
    assert!(rel_l2(&y, &tiny_unet_output(&tiny_unet(&[]))) > 1e-3);

    // The kohya export, continued at --alpha 2 (the file's is 4): lora_up doubles, the update
    // (and so the output) is the file's.
    let kohya = dir.join("kohya.safetensors");
    assert!(export_tiny(&a, "kohya", &kohya).status.success());
    let c = frozen_run(
        &data,
        &dir.join("c/c.safetensors"),
        &kohya,
        &[&CONV_TE[..], &["--alpha", "2", "--conv-alpha", "0.5"]].concat(),
    );
    let (fa, fc) = (
        SafeTensorsFile::open(&a).unwrap(),
        SafeTensorsFile::open(&c).unwrap(),
    );
    let up = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight";
    let want = fa.tensor(up).unwrap().scale(2.0).unwrap();
    assert_eq!(rel_l2(&fc.tensor(up).unwrap(), &want), 0.0);
    let r = rel_l2(&merged_output(&c), &y);
    assert!(r < 1e-6, "kohya export at another alpha: {r}");

    // The diffusers/PEFT export: no alpha tensors, the scale folded into lora_B.
    let peft = dir.join("peft.safetensors");
    assert!(export_tiny(&a, "diffusers", &peft).status.success());
    let d = frozen_run(&data, &dir.join("d/d.safetensors"), &peft, &CONV_TE);
    let r = rel_l2(&merged_output(&d), &y);
    assert!(r < 1e-6, "diffusers export: {r}");

    // A run with modules the file lacks: they start fresh (lora_up zero), the file's as stored.
    let e = frozen_run(
        &data,
        &dir.join("e/e.safetensors"),
        &a,
        &[&CONV_TE[..], &["--targets", "all"]].concat(),
    );
    let r = rel_l2(&merged_output(&e), &y);
    assert!(r < 1e-6, "extra fresh modules changed the output: {r}");
    let ff = SafeTensorsFile::open(&e).unwrap();
    let fresh_up = "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_2.lora_up.weight";
    let z = ff.tensor(fresh_up).unwrap().to_vec_f64().unwrap();
    assert!(!z.is_empty() && z.iter().all(|&v| v == 0.0));

    // DoRA: the magnitudes come back too, from the adapter and from its PEFT export.
    let dora_args = [&["--dora-wd"][..], &CONV_TE[..]].concat();
    let trained = [&["--max-steps", "2", "--lr", "1e-2"][..], &dora_args[..]].concat();
    let g = train_ok(&data, &dir.join("g/dora.safetensors"), "lora", &trained);
    let h = frozen_run(&data, &dir.join("h/h.safetensors"), &g, &dora_args);
    assert_eq!(tensors(&h), tensors(&g));
    let peft = dir.join("dora-peft.safetensors");
    assert!(export_tiny(&g, "diffusers", &peft).status.success());
    let i = frozen_run(&data, &dir.join("i/i.safetensors"), &peft, &dora_args);
    let r = rel_l2(&merged_output(&i), &merged_output(&g));
    assert!(r < 1e-6, "DoRA from its PEFT export: {r}");

    // DoRA from the plain LoRA: its factors as stored, magnitudes |W + dW| (the file's output).
    let j = frozen_run(&data, &dir.join("j/j.safetensors"), &a, &dora_args);
    let (lora, dora) = (tensors(&a), tensors(&j));
    assert!(dora.iter().any(|(n, _)| n.ends_with(".dora_scale")));
    let factors: Vec<_> = dora
        .into_iter()
        .filter(|(n, _)| !n.ends_with(".dora_scale"))
        .collect();
    assert_eq!(factors, lora);
    let r = rel_l2(&merged_output(&j), &y);
    assert!(r < 1e-6, "DoRA from a plain LoRA: {r}");
}

/// A LyCORIS run (`args`: its --algo) trained two steps, then started from its adapter at rate 0
/// (it comes back bit for bit) and from its kohya export at other alphas (the same output).
/// Returns the adapter.
fn lycoris_round_trip(data: &Path, dir: &Path, args: &[&str]) -> std::path::PathBuf {
    let trained = [&["--max-steps", "2", "--lr", "1e-2"][..], args].concat();
    let a = train_ok(data, &dir.join("a/adapter.safetensors"), "lora", &trained);
    let b = frozen_run(data, &dir.join("b/b.safetensors"), &a, args);
    assert_eq!(tensors(&b), tensors(&a));
    let kohya = dir.join("kohya.safetensors");
    assert!(export_tiny(&a, "kohya", &kohya).status.success());
    let other = [args, &["--alpha", "2", "--conv-alpha", "0.5"]].concat();
    let c = frozen_run(data, &dir.join("c/c.safetensors"), &kohya, &other);
    let r = rel_l2(&merged_output(&c), &merged_output(&a));
    assert!(r < 1e-6, "{args:?}: kohya export at other alphas: {r}");
    assert_ne!(
        tensors(&c),
        tensors(&a),
        "{args:?}: the alphas changed nothing"
    );
    a
}

#[test]
fn loha_and_lokr_files_start_their_runs() {
    let dir = tmp("network-weights-lycoris");
    let data = dataset(&dir);
    let loha_args = ["--algo", "loha", "--conv-dim", "2", "--train-text-encoder"];
    let loha = lycoris_round_trip(&data, &dir.join("loha"), &loha_args);
    // LoKr at --conv-dim 2: w2 whole on the linears (scale 1), a rank-2 pair on the 3x3 convs.
    let lokr_args = ["--algo", "lokr", "--conv-dim", "2", "--train-text-encoder"];
    let lokr = lycoris_round_trip(&data, &dir.join("lokr"), &lokr_args);

    // DoHa / DoKr from the plain files: the factors as stored, starting at the files' output.
    for (file, args) in [(&loha, &loha_args), (&lokr, &lokr_args)] {
        let out = dir.join(format!("do-{}.safetensors", args[1]));
        let d = frozen_run(&data, &out, file, &[&args[..], &["--dora-wd"]].concat());
        let r = rel_l2(&merged_output(&d), &merged_output(file));
        assert!(r < 1e-6, "{args:?} --dora-wd from the plain file: {r}");
    }

    // --dim-from-weights takes the file's ranks and, for LoKr, its factor shapes.
    let loha_r2 = train_ok(
        &data,
        &dir.join("loha-r2.safetensors"),
        "lora",
        &[
            "--max-steps",
            "2",
            "--lr",
            "1e-2",
            "--algo",
            "loha",
            "--rank",
            "2",
            "--alpha",
            "1",
        ],
    );
    let from = |algo: &'static str, more: &'static [&'static str]| {
        [&["--algo", algo, "--dim-from-weights"][..], more].concat()
    };
    let e = frozen_run(
        &data,
        &dir.join("e.safetensors"),
        &loha_r2,
        &from("loha", &[]),
    );
    assert_eq!(tensors(&e), tensors(&loha_r2));
    let f = frozen_run(
        &data,
        &dir.join("f.safetensors"),
        &lokr,
        &from("lokr", &["--lokr-factor", "2", "--train-text-encoder"]),
    );
    assert_eq!(tensors(&f), tensors(&lokr));

    let refused = |file: &Path, extra: &[&str], needle: &str| {
        let w = [
            "--max-steps",
            "1",
            "--network-weights",
            file.to_str().unwrap(),
        ];
        let o = train(
            &data,
            &dir.join("refused.safetensors"),
            "lora",
            &[&w[..], extra].concat(),
        );
        assert_fails_naming(&o, needle);
    };
    refused(&loha_r2, &["--algo", "lokr"], "pass --algo loha");
    refused(&loha_r2, &["--algo", "loha"], "pass --rank 2");
    refused(&loha_r2, &[], "pass --algo loha");
    refused(&loha_r2, &["--dim-from-weights"], "pass --algo loha");
    refused(
        &lokr,
        &[&lokr_args[..], &["--lokr-factor", "2"]].concat(),
        "--lokr-factor",
    );
    let lora = train_ok(
        &data,
        &dir.join("lora.safetensors"),
        "lora",
        &["--max-steps", "1"],
    );
    refused(&lora, &["--algo", "loha"], "pass --algo lora");
}

#[test]
fn network_weights_that_do_not_fit_the_run_are_refused_by_name() {
    let dir = tmp("network-weights-refused");
    let data = dataset(&dir);
    let one = ["--max-steps", "1"];
    let a = train_ok(
        &data,
        &dir.join("a.safetensors"),
        "lora",
        &[&one[..], &CONV_TE[..]].concat(),
    );
    let w = a.to_str().unwrap();
    let refused = |extra: &[&str], method: &str, needle: &str| {
        let args = [&one[..], &["--network-weights", w][..], extra].concat();
        let o = train(&data, &dir.join("refused.safetensors"), method, &args);
        assert_fails_naming(&o, needle);
    };
    refused(
        &[&CONV_TE[..], &["--rank", "8"]].concat(),
        "lora",
        "pass --rank 4",
    );
    refused(&["--conv-dim", "2"], "lora", "--train-text-encoder");
    refused(&["--train-text-encoder"], "lora", "no adapter in this run");
    refused(&CONV_TE, "kstyle", "gates LoRA's rank");
    refused(
        &[&CONV_TE[..], &["--resume", w]].concat(),
        "lora",
        "cannot be used with",
    );
    let dora = train_ok(
        &data,
        &dir.join("dora.safetensors"),
        "lora",
        &[&one[..], &["--dora-wd"]].concat(),
    );
    let o = train(
        &data,
        &dir.join("refused.safetensors"),
        "lora",
        &[&one[..], &["--network-weights", dora.to_str().unwrap()]].concat(),
    );
    assert_fails_naming(&o, "train it with --dora-wd");
    let loha = train_ok(
        &data,
        &dir.join("loha.safetensors"),
        "lora",
        &[&one[..], &["--algo", "loha"]].concat(),
    );
    let o = train(
        &data,
        &dir.join("refused.safetensors"),
        "lora",
        &[&one[..], &["--network-weights", loha.to_str().unwrap()]].concat(),
    );
    assert_fails_naming(&o, "pass --algo loha");
    // A damaged file: cut in half.
    let bytes = std::fs::read(&a).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let o = train(
        &data,
        &dir.join("refused.safetensors"),
        "lora",
        &[
            &one[..],
            &CONV_TE[..],
            &["--network-weights", cut.to_str().unwrap()],
        ]
        .concat(),
    );
    assert_fails_naming(&o, "cut.safetensors");
}

#[test]
fn dim_from_weights_takes_the_files_modules_ranks_and_alphas() {
    let dir = tmp("dim-from-weights");
    let data = dataset(&dir);
    let shape = [
        "--rank",
        "8",
        "--alpha",
        "2",
        "--conv-dim",
        "2",
        "--targets",
        "to_k,to_v,proj_out",
    ];
    let trained = [
        &["--max-steps", "2", "--lr", "1e-2", "--train-text-encoder"][..],
        &shape[..],
    ]
    .concat();
    let a = train_ok(&data, &dir.join("a/adapter.safetensors"), "lora", &trained);
    // Nothing of the run's own shape is given: the file's comes back bit for bit.
    let from_file = ["--dim-from-weights", "--train-text-encoder"];
    let b = frozen_run(&data, &dir.join("b/b.safetensors"), &a, &from_file);
    assert_eq!(tensors(&b), tensors(&a));
    assert_eq!(setting(&b, "dim_from_weights"), "true");

    // Its diffusers export: the folded scale becomes alpha = rank on each module.
    let peft = dir.join("peft.safetensors");
    assert!(export_tiny(&a, "diffusers", &peft).status.success());
    let c = frozen_run(&data, &dir.join("c/c.safetensors"), &peft, &from_file);
    let r = rel_l2(&merged_output(&c), &merged_output(&a));
    assert!(r < 1e-6, "from the diffusers export: {r}");
    let f = SafeTensorsFile::open(&c).unwrap();
    let mut ranks = std::collections::BTreeSet::new();
    for name in f.names().filter(|n| n.ends_with(".alpha")) {
        let module = name.strip_suffix(".alpha").unwrap();
        let rank = f.info(&format!("{module}.lora_down.weight")).unwrap().1[0];
        let alpha = f.tensor(name).unwrap().to_scalar().unwrap();
        assert_eq!(alpha, rank as f64, "{module}");
        ranks.insert(rank);
    }
    assert_eq!(ranks.into_iter().collect::<Vec<_>>(), [2, 8]);

    let w = a.to_str().unwrap();
    let refused = |extra: &[&str], needle: &str| {
        let args = [&["--max-steps", "1", "--network-weights", w][..], extra].concat();
        let o = train(&data, &dir.join("refused.safetensors"), "lora", &args);
        assert_fails_naming(&o, needle);
    };
    refused(
        &[&from_file[..], &["--rank", "4"]].concat(),
        "cannot be used with",
    );
    refused(
        &[&from_file[..], &["--block-dims", &["4"; 23].join(",")]].concat(),
        "leave the block ranks",
    );
    refused(&["--dim-from-weights"], "--train-text-encoder");
    let o = train(
        &data,
        &dir.join("refused.safetensors"),
        "lora",
        &["--max-steps", "1", "--dim-from-weights"],
    );
    assert_fails_naming(&o, "--network-weights");
    // A file without text-encoder modules, run with --train-text-encoder.
    let unet_only = train_ok(
        &data,
        &dir.join("u.safetensors"),
        "lora",
        &["--max-steps", "1"],
    );
    let args = [
        &[
            "--max-steps",
            "1",
            "--network-weights",
            unet_only.to_str().unwrap(),
        ][..],
        &from_file[..],
    ]
    .concat();
    let o = train(&data, &dir.join("refused.safetensors"), "lora", &args);
    assert_fails_naming(&o, "no text-encoder modules");
}
