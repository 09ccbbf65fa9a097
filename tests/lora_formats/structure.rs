//! LyCORIS storages on random factors against their definitions (torch.kron's layout, Tucker
//! cores against the plain factors they expand to, DoRA's renormalised magnitudes, full
//! differences), and malformed or randomly shaped files failing by name, never by panic.

use super::*;

/// Random f64 values of `shape`.
fn randn(rng: &mut Rng, shape: &[usize]) -> (Vec<f64>, RawTensor<'static>) {
    let v: Vec<f64> = (0..shape.iter().product()).map(|_| rng.normal()).collect();
    let t = f64_tensor(shape.to_vec(), &v);
    (v, t)
}

/// Merged `<module>.weight` of a one-module file at strength `m`, as f64.
fn merge_one(dir: &Path, map: &TensorMap<'_>, module: &str, m: f64) -> (Vec<f64>, Vec<f64>) {
    let path = save(dir, "one.safetensors", map, None);
    let base = component("unet");
    let mut w = base.clone();
    merge_kohya(&mut w, &config().layout(), &KohyaLoraFile::new(&path, m)).unwrap();
    let key = format!("{module}.weight");
    (
        base[&key].to_vec_f64().unwrap(),
        w[&key].to_vec_f64().unwrap(),
    )
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
        .fold(0.0, f64::max);
    assert!(worst < 1e-12, "{what}: {worst}");
}

#[test]
fn kronecker_updates_follow_torch_kron_on_linear_and_conv_weights() {
    let dir = tmp("lora-lokr");
    let mut rng = Rng::new(11);
    // proj_in of down_blocks.1 is (48, 48); w1 (2, 3) -> w2 (24, 16).
    let lin = "down_blocks.1.attentions.0.proj_in";
    let (w1, t1) = randn(&mut rng, &[2, 3]);
    let (w2, t2) = randn(&mut rng, &[24, 16]);
    let n = format!("lora_unet_{}", lin.replace('.', "_"));
    let map = TensorMap::from([
        (format!("{n}.lokr_w1"), t1),
        (format!("{n}.lokr_w2"), t2),
        (format!("{n}.alpha"), f64_tensor(vec![], &[7.0])),
    ]);
    let (base, got) = merge_one(&dir, &map, lin, 0.5);
    let want: Vec<f64> = (0..48 * 48)
        .map(|idx| {
            let (row, col) = (idx / 48, idx % 48);
            // Both factors whole: alpha is ignored (scale 1).
            base[idx] + 0.5 * w1[(row / 24) * 3 + col / 16] * w2[(row % 24) * 16 + col % 16]
        })
        .collect();
    assert_close(&got, &want, "linear kron");

    // conv1 of down_blocks.0.resnets.0 is (32, 32, 3, 3); w1 (2, 4) -> w2 (16, 8, 3, 3) from
    // a rank-3 product, alpha 6 over rank 3.
    let conv = "down_blocks.0.resnets.0.conv1";
    let (w1, t1) = randn(&mut rng, &[2, 4]);
    let (a, ta) = randn(&mut rng, &[16, 3]);
    let (b, tb) = randn(&mut rng, &[3, 8 * 9]);
    let n = format!("lora_unet_{}", conv.replace('.', "_"));
    let map = TensorMap::from([
        (format!("{n}.lokr_w1"), t1),
        (format!("{n}.lokr_w2_a"), ta),
        (format!("{n}.lokr_w2_b"), tb),
        (format!("{n}.alpha"), f64_tensor(vec![], &[6.0])),
    ]);
    let (base, got) = merge_one(&dir, &map, conv, 1.0);
    let w2 = |k: usize, l: usize, s: usize| {
        (0..3)
            .map(|r| a[k * 3 + r] * b[r * 72 + l * 9 + s])
            .sum::<f64>()
    };
    let want: Vec<f64> = (0..32 * 32 * 9)
        .map(|idx| {
            let (o, i, s) = (idx / 288, (idx / 9) % 32, idx % 9);
            base[idx] + 2.0 * w1[(o / 16) * 4 + i / 8] * w2(o % 16, i % 8, s)
        })
        .collect();
    assert_close(&got, &want, "conv kron");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tucker_cores_match_their_expanded_factors() {
    let dir = tmp("lora-tucker");
    let mut rng = Rng::new(12);
    let conv = "down_blocks.0.resnets.0.conv1"; // (32, 32, 3, 3)
    let n = format!("lora_unet_{}", conv.replace('.', "_"));
    let r = 3;
    // LoCon: down (r, 32, 1, 1), mid (r, r, 3, 3), up (32, r, 1, 1) against the plain conv LoRA
    // whose down is Σ_n mid[m, n] down[n].
    let (down, td) = randn(&mut rng, &[r, 32, 1, 1]);
    let (mid, tm) = randn(&mut rng, &[r, r, 3, 3]);
    let (_, tu) = randn(&mut rng, &[32, r, 1, 1]);
    let expanded: Vec<f64> = (0..r * 32 * 9)
        .map(|idx| {
            let (m, i, s) = (idx / 288, (idx / 9) % 32, idx % 9);
            (0..r)
                .map(|n| mid[(m * r + n) * 9 + s] * down[n * 32 + i])
                .sum()
        })
        .collect();
    let alpha = f64_tensor(vec![], &[1.5]);
    let core = TensorMap::from([
        (format!("{n}.lora_down.weight"), td),
        (format!("{n}.lora_mid.weight"), tm),
        (format!("{n}.lora_up.weight"), tu.clone()),
        (format!("{n}.alpha"), alpha.clone()),
    ]);
    let plain = TensorMap::from([
        (
            format!("{n}.lora_down.weight"),
            f64_tensor(vec![r, 32, 3, 3], &expanded),
        ),
        (format!("{n}.lora_up.weight"), tu),
        (format!("{n}.alpha"), alpha.clone()),
    ]);
    let (_, got) = merge_one(&dir, &core, conv, 0.8);
    let (_, want) = merge_one(&dir, &plain, conv, 0.8);
    assert_close(&got, &want, "LoCon core");

    // LoHa with cores t = δ_ij c_s: each factor is c_s · (aᵀ b), the non-Tucker factor with
    // a transposed and b spread over the kernel by c.
    let c: Vec<f64> = (0..9).map(|_| rng.normal()).collect();
    let d: Vec<f64> = (0..9).map(|_| rng.normal()).collect();
    let core_of = |c: &[f64]| {
        let v: Vec<f64> = (0..r * r * 9)
            .map(|idx| {
                if idx / 9 / r == (idx / 9) % r {
                    c[idx % 9]
                } else {
                    0.0
                }
            })
            .collect();
        f64_tensor(vec![r, r, 3, 3], &v)
    };
    let (a1, ta1) = randn(&mut rng, &[r, 32]);
    let (b1, tb1) = randn(&mut rng, &[r, 32]);
    let (a2, ta2) = randn(&mut rng, &[r, 32]);
    let (b2, tb2) = randn(&mut rng, &[r, 32]);
    let tucker = TensorMap::from([
        (format!("{n}.hada_w1_a"), ta1),
        (format!("{n}.hada_w1_b"), tb1),
        (format!("{n}.hada_w2_a"), ta2),
        (format!("{n}.hada_w2_b"), tb2),
        (format!("{n}.hada_t1"), core_of(&c)),
        (format!("{n}.hada_t2"), core_of(&d)),
        (format!("{n}.alpha"), alpha.clone()),
    ]);
    let transpose =
        |a: &[f64]| -> Vec<f64> { (0..32 * r).map(|i| a[(i % r) * 32 + i / r]).collect() };
    let spread = |b: &[f64], c: &[f64]| -> Vec<f64> {
        (0..r * 32 * 9).map(|i| b[i / 9] * c[i % 9]).collect()
    };
    let flat = TensorMap::from([
        (
            format!("{n}.hada_w1_a"),
            f64_tensor(vec![32, r], &transpose(&a1)),
        ),
        (
            format!("{n}.hada_w1_b"),
            f64_tensor(vec![r, 32 * 9], &spread(&b1, &c)),
        ),
        (
            format!("{n}.hada_w2_a"),
            f64_tensor(vec![32, r], &transpose(&a2)),
        ),
        (
            format!("{n}.hada_w2_b"),
            f64_tensor(vec![r, 32 * 9], &spread(&b2, &d)),
        ),
        (format!("{n}.alpha"), alpha),
    ]);
    let (_, got) = merge_one(&dir, &tucker, conv, 1.0);
    let (_, want) = merge_one(&dir, &flat, conv, 1.0);
    assert_close(&got, &want, "LoHa cores");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dora_magnitudes_renormalise_rows_or_columns() {
    let dir = tmp("lora-dora");
    let mut rng = Rng::new(13);
    let module = "down_blocks.1.attentions.0.proj_in"; // (48, 48)
    let n = format!("lora_unet_{}", module.replace('.', "_"));
    let (down, td) = randn(&mut rng, &[2, 48]);
    let (up, tu) = randn(&mut rng, &[48, 2]);
    let plain = TensorMap::from([
        (format!("{n}.lora_down.weight"), td.clone()),
        (format!("{n}.lora_up.weight"), tu.clone()),
    ]);
    let (base, _) = merge_one(&dir, &plain, module, 1.0);
    // W + ΔW (scale 1: no alpha), and its row and column norms.
    let wc: Vec<f64> = (0..48 * 48)
        .map(|i| {
            base[i]
                + (0..2)
                    .map(|k| up[(i / 48) * 2 + k] * down[k * 48 + i % 48])
                    .sum::<f64>()
        })
        .collect();
    let row_norm: Vec<f64> = (0..48)
        .map(|o| {
            wc[o * 48..(o + 1) * 48]
                .iter()
                .map(|x| x * x)
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let col_norm: Vec<f64> = (0..48)
        .map(|i| (0..48).map(|o| wc[o * 48 + i].powi(2)).sum::<f64>().sqrt())
        .collect();

    // PEFT: magnitude = 2 · row norms doubles W + ΔW.
    let twice: Vec<f64> = row_norm.iter().map(|x| 2.0 * x).collect();
    let peft = TensorMap::from([
        (
            "unet.down_blocks.1.attentions.0.proj_in.lora_A.weight".to_string(),
            td.clone(),
        ),
        (
            "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight".to_string(),
            tu.clone(),
        ),
        (
            "unet.down_blocks.1.attentions.0.proj_in.lora_magnitude_vector".to_string(),
            f64_tensor(vec![48], &twice),
        ),
    ]);
    let (_, got) = merge_one(&dir, &peft, module, 1.0);
    let want: Vec<f64> = wc.iter().map(|x| 2.0 * x).collect();
    assert_close(&got, &want, "PEFT DoRA");

    // kohya / LyCORIS dora_scale per input column, = the column norms: W + ΔW itself; at
    // strength 0.5 the merge interpolates halfway from W.
    let mut dora = plain.clone();
    dora.insert(
        format!("{n}.dora_scale"),
        f64_tensor(vec![1, 48], &col_norm),
    );
    let (_, got) = merge_one(&dir, &dora, module, 1.0);
    assert_close(&got, &wc, "dora_scale columns");
    let (_, got) = merge_one(&dir, &dora, module, 0.5);
    let half: Vec<f64> = base
        .iter()
        .zip(&wc)
        .map(|(w, c)| w + 0.5 * (c - w))
        .collect();
    assert_close(&got, &half, "dora_scale at 0.5");
    // ... and per output row when stored (out, 1).
    let mut rows = plain;
    let halved: Vec<f64> = row_norm.iter().map(|x| 0.5 * x).collect();
    rows.insert(format!("{n}.dora_scale"), f64_tensor(vec![48, 1], &halved));
    let (_, got) = merge_one(&dir, &rows, module, 1.0);
    let want: Vec<f64> = wc.iter().map(|x| 0.5 * x).collect();
    assert_close(&got, &want, "dora_scale rows");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn full_differences_patch_weight_and_bias() {
    let dir = tmp("lora-diff");
    let mut rng = Rng::new(14);
    let module = "down_blocks.1.attentions.0.proj_in"; // Linear with a bias
    let n = format!("lora_unet_{}", module.replace('.', "_"));
    let (d, td) = randn(&mut rng, &[48, 48]);
    let (db, tdb) = randn(&mut rng, &[48]);
    let map = TensorMap::from([(format!("{n}.diff"), td), (format!("{n}.diff_b"), tdb)]);
    let path = save(&dir, "diff.safetensors", &map, None);
    let base = component("unet");
    let mut w = base.clone();
    merge_kohya(
        &mut w,
        &config().layout(),
        &KohyaLoraFile::new(&path, -0.25),
    )
    .unwrap();
    for (key, delta) in [("weight", &d), ("bias", &db)] {
        let key = format!("{module}.{key}");
        let b = base[&key].to_vec_f64().unwrap();
        let want: Vec<f64> = b.iter().zip(delta).map(|(x, y)| x - 0.25 * y).collect();
        assert_close(&w[&key].to_vec_f64().unwrap(), &want, &key);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn malformed_lycoris_files_fail_naming_module_or_key() {
    let dir = tmp("lora-bad");
    let n = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"; // (48, 48)
    let t = |shape: &[usize]| f64_tensor(shape.to_vec(), &vec![0.5; shape.iter().product()]);
    let cases: Vec<(&str, TensorMap<'static>, &str)> = vec![
        (
            "LoHa without its second factor's b",
            TensorMap::from([
                (format!("{n}.hada_w1_a"), t(&[48, 2])),
                (format!("{n}.hada_w1_b"), t(&[2, 48])),
                (format!("{n}.hada_w2_a"), t(&[48, 2])),
            ]),
            "HadaW2b",
        ),
        (
            "a 0-d LoHa factor",
            TensorMap::from([
                (format!("{n}.hada_w1_a"), t(&[48, 2])),
                (format!("{n}.hada_w1_b"), t(&[])),
                (format!("{n}.hada_w2_a"), t(&[48, 2])),
                (format!("{n}.hada_w2_b"), t(&[2, 48])),
            ]),
            "hada_w1_b",
        ),
        (
            "a LoKr w1 that divides nothing",
            TensorMap::from([
                (format!("{n}.lokr_w1"), t(&[5, 7])),
                (format!("{n}.lokr_w2"), t(&[2, 2])),
            ]),
            "lokr_w1",
        ),
        (
            "a dora_scale of the wrong shape",
            TensorMap::from([
                (format!("{n}.lora_down.weight"), t(&[2, 48])),
                (format!("{n}.lora_up.weight"), t(&[48, 2])),
                (format!("{n}.dora_scale"), t(&[2, 48])),
            ]),
            "dora_scale",
        ),
        (
            "a bias difference for a module without a bias",
            TensorMap::from([
                (format!("{n}.diff"), t(&[48, 48])),
                (format!("{n}.diff_b"), t(&[48])),
            ]),
            "attn1.to_q.bias",
        ),
        (
            "a norm-layer difference (not read here)",
            TensorMap::from([("lora_unet_out_0.w_norm".to_string(), t(&[32]))]),
            "lora_unet_out_0.w_norm",
        ),
        (
            "two spellings of one module",
            TensorMap::from([
                (format!("{n}.lora_down.weight"), t(&[2, 48])),
                (format!("{n}.lora_up.weight"), t(&[48, 2])),
                (
                    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
                        .to_string(),
                    t(&[2, 48]),
                ),
                (
                    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"
                        .to_string(),
                    t(&[48, 2]),
                ),
            ]),
            "already targets",
        ),
    ];
    for (what, map, needle) in cases {
        let path = save(&dir, "bad.safetensors", &map, None);
        let mut w = component("unet");
        let err = merge_kohya(&mut w, &config().layout(), &KohyaLoraFile::new(&path, 1.0))
            .expect_err(what)
            .to_string();
        assert!(
            err.contains(needle) && err.contains("bad.safetensors"),
            "{what}: {err}"
        );
    }
    // Broken metadata is an error too, not a silent scale of 1.
    let map = TensorMap::from([
        (
            "unet.down_blocks.1.attentions.0.proj_in.lora_A.weight".to_string(),
            t(&[2, 48]),
        ),
        (
            "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight".to_string(),
            t(&[48, 2]),
        ),
    ]);
    let path = save(
        &dir,
        "bad.safetensors",
        &map,
        Some(("lora_adapter_metadata", "{r: 4".into())),
    );
    let mut w = component("unet");
    let err = merge_kohya(&mut w, &config().layout(), &KohyaLoraFile::new(&path, 1.0)).unwrap_err();
    assert!(err.to_string().contains("lora_adapter_metadata"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Whatever a file holds under the recognised suffixes, parsing and merging return a result and
/// never panic: random roles, ranks and shapes (0-d, empty, mismatched) against a linear and a
/// conv target.
#[test]
fn random_factor_shapes_never_panic() {
    let base = component("unet");
    let model = KohyaModel::new(vec![unet_index(&base)]);
    let mut rng = Rng::new(21);
    let suffixes = [
        ".lora_down.weight",
        ".lora_up.weight",
        ".lora_mid.weight",
        ".alpha",
        ".dora_scale",
        ".lora_magnitude_vector",
        ".hada_w1_a",
        ".hada_w1_b",
        ".hada_w2_a",
        ".hada_w2_b",
        ".hada_t1",
        ".hada_t2",
        ".lokr_w1",
        ".lokr_w1_a",
        ".lokr_w1_b",
        ".lokr_w2",
        ".lokr_w2_a",
        ".lokr_w2_b",
        ".lokr_t2",
        ".diff",
        ".diff_b",
    ];
    // (module, weight dims) of a Linear with a bias and a 3x3 conv.
    let targets = [
        ("down_blocks.1.attentions.0.proj_in", vec![48usize, 48]),
        ("down_blocks.0.resnets.0.conv1", vec![32, 32, 3, 3]),
    ];
    let mut pick = |n: usize| (rng.uniform() * n as f64) as usize % n.max(1);
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..2000 {
        let (module, dims) = &targets[pick(2)];
        let n = format!("lora_unet_{}", module.replace('.', "_"));
        let (out, cin) = (dims[0], dims[1]);
        let k: Vec<usize> = dims[2..].to_vec(); // [] or [3, 3]
        let sp: usize = k.iter().product();
        let with = |head: &[usize], tail: &[usize]| [head, tail].concat();
        let ones: Vec<usize> = k.iter().map(|_| 1).collect();
        // Valid files of each storage, rank 2, then perturbed below.
        let templates: Vec<Vec<(&str, Vec<usize>)>> = vec![
            vec![
                (".lora_down.weight", with(&[2, cin], &k)),
                (".lora_up.weight", with(&[out, 2], &ones)),
                (".alpha", vec![]),
                (".dora_scale", with(&[1, cin], &ones)),
            ],
            vec![
                (".lora_down.weight", with(&[2, cin], &ones)),
                (".lora_mid.weight", with(&[2, 2], &k)),
                (".lora_up.weight", with(&[out, 2], &ones)),
                (".lora_magnitude_vector", vec![out]),
            ],
            vec![
                (".hada_w1_a", vec![out, 2]),
                (".hada_w1_b", vec![2, cin * sp]),
                (".hada_w2_a", vec![out, 2]),
                (".hada_w2_b", vec![2, cin * sp]),
                (".alpha", vec![]),
            ],
            vec![
                (".hada_w1_a", vec![2, out]),
                (".hada_w1_b", vec![2, cin]),
                (".hada_w2_a", vec![2, out]),
                (".hada_w2_b", vec![2, cin]),
                (".hada_t1", with(&[2, 2], &k)),
                (".hada_t2", with(&[2, 2], &k)),
            ],
            vec![
                (".lokr_w1", vec![2, 2]),
                (".lokr_w2_a", vec![out / 2, 2]),
                (".lokr_w2_b", vec![2, cin / 2 * sp]),
                (".alpha", vec![]),
            ],
            vec![
                (".lokr_w1_a", vec![2, 1]),
                (".lokr_w1_b", vec![1, 2]),
                (".lokr_w2", with(&[out / 2, cin / 2], &k)),
                (".lokr_t2", with(&[2, 2], &k)),
            ],
            vec![(".diff", dims.clone()), (".diff_b", vec![out])],
        ];
        let mut map = TensorMap::new();
        let mut entries: Vec<(String, Vec<usize>)> = if pick(4) == 0 {
            Vec::new()
        } else {
            templates[pick(templates.len())]
                .iter()
                .filter(|_| pick(6) != 0)
                .map(|(s, sh)| (s.to_string(), sh.clone()))
                .collect()
        };
        for _ in 0..pick(3) {
            // A stray tensor of any role with sizes drawn from the target's own dimensions.
            let sizes = [0, 1, 2, 3, 4, 9, out, cin, out / 2, cin * 9];
            let mut shape: Vec<usize> = (0..pick(5)).map(|_| sizes[pick(sizes.len())]).collect();
            while shape.iter().product::<usize>() > 1 << 18 {
                shape.pop();
            }
            entries.push((suffixes[pick(suffixes.len())].to_string(), shape));
        }
        for (suffix, shape) in entries {
            let v: Vec<f64> = (0..shape.iter().product())
                .map(|i| (i % 7) as f64 * 0.1)
                .collect();
            map.insert(format!("{n}{suffix}"), f64_tensor(shape, &v));
        }
        let Ok(parsed) = model.parse_patches(map, "fuzz", None) else {
            refused += 1;
            continue;
        };
        for p in &parsed.patches {
            let mut w = base[&format!("{}.weight", p.module)].to_vec_f64().unwrap();
            let mut b = base[&format!("{}.bias", p.module)].to_vec_f64().unwrap();
            match p.apply_f64(&mut w, Some(&mut b), 0.5, "fuzz") {
                Ok(()) => ok += 1,
                Err(_) => refused += 1,
            }
        }
    }
    eprintln!("ok {ok}, refused {refused}");
    // Both outcomes occur: the draw reaches valid files and broken ones.
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");
}
