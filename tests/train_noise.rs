//! kohya's noise shapes: the noise offset with its random strength and adaptive scale, and
//! multi-resolution noise, against PyTorch on recorded draws
//! (`tests/fixtures/extra/gen_train_noise.py`); then the options through the real binary on the
//! tiny model.

mod common;
use common::tmp;
use common::train::{assert_resume_is_exact, dataset, refused, tensors, train};
use kstyle::tensor::SafeTensorsFile;
use kstyle::train::noise::{Draws, Multires, NoiseOffset};
use kstyle::{DType, Result, Tensor};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};

/// The reference's draws, handed out in order; a draw of another shape, or one too many, fails.
struct Replay {
    uniforms: VecDeque<f64>,
    normals: VecDeque<Tensor>,
}

impl Draws for Replay {
    fn uniform(&mut self) -> f64 {
        self.uniforms
            .pop_front()
            .expect("a uniform draw the reference did not make")
    }

    fn randn(&mut self, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .normals
            .pop_front()
            .expect("a normal draw the reference did not make");
        assert_eq!(t.dims(), shape, "the reference drew another shape");
        Ok(t)
    }
}

#[test]
fn noise_shapes_match_pytorch_on_its_draws() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/extra/train_noise.safetensors");
    let f = SafeTensorsFile::open(&path).unwrap();
    let meta = |k: &str| f.metadata()[k].clone();
    let get = |k: &str| f.tensor(k).unwrap().to_dtype(DType::F32).unwrap();
    let cases = meta("cases");
    for case in cases.split(',') {
        let key = |k: &str| format!("{case}.{k}");
        let noise = get(&key("noise"));
        let (got, replay) = match meta(&key("kind")).as_str() {
            "multires" => {
                let r = get(&key("r")).to_vec_f64().unwrap();
                let mut replay = Replay {
                    // r = 2 + 2u, exact both ways for r in [2, 4).
                    uniforms: r.iter().map(|r| (r - 2.0) / 2.0).collect(),
                    normals: (0..r.len())
                        .map(|i| get(&key(&format!("level{i}"))))
                        .collect(),
                };
                let m = Multires {
                    iterations: meta(&key("iterations")).parse().unwrap(),
                    discount: meta(&key("discount")).parse().unwrap(),
                };
                (m.apply(&noise, &mut replay).unwrap(), replay)
            }
            _ => {
                let random_strength = meta(&key("random_strength")) == "True";
                let mut replay = Replay {
                    uniforms: match random_strength {
                        true => get(&key("u")).to_vec_f64().unwrap().into(),
                        false => VecDeque::new(),
                    },
                    normals: VecDeque::from([get(&key("d"))]),
                };
                let o = NoiseOffset {
                    offset: meta(&key("offset")).parse().unwrap(),
                    random_strength,
                    adaptive: meta(&key("adaptive")).parse().ok(),
                };
                let x0 = get(&key("x0"));
                (o.apply(&noise, &x0, &mut replay).unwrap(), replay)
            }
        };
        assert!(
            replay.uniforms.is_empty() && replay.normals.is_empty(),
            "{case}: draws the reference made were not used"
        );
        let want = get(&key("result")).to_vec_f64().unwrap();
        let got = got.to_vec_f64().unwrap();
        assert_eq!(got.len(), want.len(), "{case}");
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        // Both sides are f32 roundings of the same f64 values (ours and PyTorch's).
        assert!(err <= 1e-6 * scale, "{case}: max error {err:e} of {scale}");
    }
}

/// A `kstyle` run of `steps` on `data` with `extra`, which must succeed.
fn run(data: &Path, dir: &Path, name: &str, steps: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(name).join("a.safetensors");
    let cache = dir.join("cache");
    let c = ["--max-steps", steps, "--cache", cache.to_str().unwrap()];
    let o = train(data, &out, "kstyle", &[&c[..], extra].concat());
    assert!(
        o.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

#[test]
fn noise_options_train_record_and_resume() {
    let dir = tmp("noise-options");
    let data = dataset(&dir);
    let plain = run(&data, &dir, "plain", "2", &[]);
    // 0 is off, as kohya reads it: the plain run bit for bit.
    for (name, extra) in [
        ("offset0", &["--noise-offset", "0"][..]),
        ("multires0", &["--multires-noise-iterations", "0"]),
    ] {
        let out = run(&data, &dir, name, "2", extra);
        assert!(tensors(&out) == tensors(&plain), "{name} changed the run");
    }
    let mut seen = vec![common::first_losses(&plain)[1]];
    for (name, extra, key, recorded) in [
        (
            "random",
            &["--noise-offset", "0.1", "--noise-offset-random-strength"][..],
            "noise_offset",
            "0.1 random",
        ),
        (
            "adaptive",
            &["--noise-offset", "0.1", "--adaptive-noise-scale", "0.5"],
            "noise_offset",
            "0.1 adaptive 0.5",
        ),
        (
            "multires",
            &["--multires-noise-iterations", "6"],
            "multires_noise",
            "6 discount 0.3",
        ),
        (
            "discount",
            &[
                "--multires-noise-iterations",
                "6",
                "--multires-noise-discount",
                "0.8",
            ],
            "multires_noise",
            "6 discount 0.8",
        ),
        (
            "ip",
            &[
                "--ip-noise-gamma",
                "0.1",
                "--ip-noise-gamma-random-strength",
            ],
            "ip_noise_gamma",
            "0.1 random",
        ),
    ] {
        let out = run(&data, &dir, name, "1", extra);
        let loss = common::first_losses(&out)[1];
        assert!(loss.is_finite() && loss > 0.0, "{name}: {loss}");
        assert!(
            !seen.contains(&loss),
            "{name}: {loss} seen already in {seen:?}"
        );
        seen.push(loss);
        let f = SafeTensorsFile::open(&out).unwrap();
        assert_eq!(
            f.metadata()[&format!("kstyle.train.{key}")],
            recorded,
            "{name}"
        );
    }
    assert_resume_is_exact(
        &data,
        &dir.join("resume"),
        "kstyle",
        &[
            "--noise-offset",
            "0.05",
            "--noise-offset-random-strength",
            "--adaptive-noise-scale",
            "0.2",
            "--multires-noise-iterations",
            "4",
            "--ip-noise-gamma",
            "0.1",
            "--ip-noise-gamma-random-strength",
        ],
        "noise",
    );
    for (extra, needle) in [
        (&["--noise-offset-random-strength"][..], "--noise-offset"),
        (&["--adaptive-noise-scale", "0.3"], "--adaptive-noise-scale"),
        (
            &["--noise-offset", "0.1", "--adaptive-noise-scale", "inf"],
            "--adaptive-noise-scale",
        ),
        (
            &["--multires-noise-discount", "0.5"],
            "--multires-noise-iterations",
        ),
        (
            &[
                "--multires-noise-iterations",
                "6",
                "--multires-noise-discount",
                "-1",
            ],
            "--multires-noise-discount",
        ),
        (&["--ip-noise-gamma-random-strength"], "--ip-noise-gamma"),
    ] {
        refused(&data, &dir, extra, needle);
    }
}
