//! Learning-rate schedules against diffusers' `get_scheduler`, read off a real optimizer
//! (tests/fixtures/extra/lr_schedules.safetensors, gen_lr_schedules.py): every schedule, with and
//! without warm-up, past the end of the run.

use kstyle::tensor::SafeTensorsFile;
use kstyle::train::lr::{LrSchedule, LrShape};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/extra/lr_schedules.safetensors"
);

fn schedule_of(settings: &serde_json::Value) -> LrSchedule {
    let warmup = settings["num_warmup_steps"].as_u64().unwrap_or(0);
    let shape = match settings["schedule"].as_str().unwrap() {
        "constant" => LrShape::Constant,
        "constant_with_warmup" => LrShape::ConstantWithWarmup,
        "linear" => LrShape::Linear,
        "cosine" => LrShape::Cosine,
        "cosine_with_restarts" => LrShape::CosineWithRestarts {
            cycles: settings["num_cycles"].as_u64().unwrap(),
        },
        "polynomial" => LrShape::Polynomial {
            power: settings["power"].as_f64().unwrap(),
        },
        other => panic!("the fixture has a schedule this test does not know: {other}"),
    };
    LrSchedule { shape, warmup }
}

#[test]
fn every_schedule_gives_diffusers_rates_step_for_step() {
    let file = SafeTensorsFile::open(FIXTURE).unwrap();
    let lr = file.meta_f64("lr").unwrap();
    let total = file.meta_f64("total_steps").unwrap() as u64;
    let cases: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(file.meta_str("cases").unwrap()).unwrap();
    assert_eq!(cases.len(), 15);
    for (name, settings) in &cases {
        let schedule = schedule_of(settings);
        schedule.check(lr).unwrap();
        let want = file.tensor(name).unwrap().to_vec_f64().unwrap();
        let got: Vec<f64> = (1..=want.len() as u64)
            .map(|step| lr * schedule.factor(step, total, lr))
            .collect();
        // The same f64 operations in the same order as diffusers' lambdas (and the same libm
        // cos and pow): equal to the bit.
        assert_eq!(got, want, "{name}: {settings}");
    }
}

#[test]
fn settings_a_schedule_would_ignore_are_refused() {
    let warm_constant = LrSchedule {
        shape: LrShape::Constant,
        warmup: 10,
    };
    let e = warm_constant.check(1e-4).unwrap_err().to_string();
    assert!(
        e.contains("--warmup 10") && e.contains("constant-with-warmup"),
        "{e}"
    );
    let no_cycles = LrSchedule {
        shape: LrShape::CosineWithRestarts { cycles: 0 },
        warmup: 0,
    };
    assert!(no_cycles
        .check(1e-4)
        .unwrap_err()
        .to_string()
        .contains("--lr-cycles"));
    let poly = LrSchedule {
        shape: LrShape::Polynomial { power: 1.0 },
        warmup: 0,
    };
    let e = poly.check(1e-7).unwrap_err().to_string();
    assert!(e.contains("1e-7") || e.contains("0.0000001"), "{e}");
    assert!(poly.check(1e-4).is_ok());
}
