//! `kstyle verify DIR [--device cpu|cuda] [--case NAME]... [--skip NAME]...`

use super::DeviceArg;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A fixtures directory: models plus reference/ (see tests/fixtures/README.md).
    pub dir: PathBuf,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Run only these cases (repeatable).
    #[arg(long = "case")]
    pub cases: Vec<String>,
    /// Leave these cases out (repeatable).
    #[arg(long = "skip")]
    pub skip: Vec<String>,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    // A misspelt case would otherwise select nothing and pass.
    let known = kstyle::verify::case_names();
    if let Some(bad) = a
        .cases
        .iter()
        .chain(&a.skip)
        .find(|c| !known.contains(&c.as_str()))
    {
        anyhow::bail!(
            "no reference case `{bad}`; the cases are: {}",
            known.join(", ")
        );
    }
    let selected: Vec<String> = known
        .iter()
        .filter(|c| a.cases.is_empty() || a.cases.iter().any(|n| n == *c))
        .filter(|c| !a.skip.iter().any(|n| n == *c))
        .map(|c| c.to_string())
        .collect();
    let only = (!a.cases.is_empty() || !a.skip.is_empty()).then_some(selected.as_slice());
    let report = kstyle::verify::run(&a.dir, a.device.device(), only)?;
    let mut text = format!(
        "{:<20} {:<64} {:>11} {:>11}  result\n",
        "case", "tensor", "error", "tolerance"
    );
    for r in &report.rows {
        let verdict = if r.passed { "PASS" } else { "FAIL" };
        text += &format!(
            "{:<20} {:<64} {:>11.3e} {:>11.3e}  {verdict}\n",
            r.case, r.tensor, r.error, r.tolerance
        );
    }
    for (case, why) in &report.failed_cases {
        text += &format!(
            "{case:<20} {:<64} {:>11} {:>11}  FAIL ({why})\n",
            "(case could not run)", "-", "-"
        );
    }
    text += &format!("{} passed, {} failed\n", report.passed(), report.failed());
    // A closed pipe (`kstyle verify DIR | head`) is the reader's choice, not an error to panic on.
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
