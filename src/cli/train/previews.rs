//! `kstyle train`'s previews: the prompts (`--sample-prompt` or a kohya prompt file) with the
//! run's defaults and `--sample-sampler`, checked against the flags that ask for previews.

use super::Args;
use anyhow::Context;
use kstyle::sample::pipeline::SamplerKind;
use kstyle::sample::prompt_syntax::uses_syntax;
use kstyle::train::samples::{parse_prompt_file, SamplePrompt};

/// The run's previews (none without a prompt); a note for each prompt in A1111's syntax, which
/// previews read as plain text.
pub(super) fn sample_prompts(a: &Args) -> anyhow::Result<Vec<SamplePrompt>> {
    let defaults = SamplePrompt {
        sampler: SamplerKind::from_name(&a.sample_sampler).context("--sample-sampler")?,
        ..SamplePrompt::new("", a.resolution, a.sample_steps, a.seed)
    };
    let sample_prompts = match (&a.sample_prompt, &a.sample_prompts) {
        (Some(p), _) => vec![SamplePrompt {
            prompt: p.clone(),
            ..defaults
        }],
        (None, Some(file)) => parse_prompt_file(file, &defaults)?,
        (None, None) => Vec::new(),
    };
    let triggers = [
        a.sample_every.is_some(),
        a.sample_every_n_epochs.is_some(),
        a.sample_at_first,
    ];
    // Prompts without a trigger make no previews: nothing to note.
    let previews = triggers.contains(&true);
    for (i, p) in sample_prompts.iter().enumerate().filter(|_| previews) {
        let texts = [Some(&p.prompt), p.negative.as_ref()];
        if texts.into_iter().flatten().any(|t| uses_syntax(t)) {
            eprintln!(
                "note: preview {} looks like A1111's prompt syntax (kohya's previews read its \
                 weights), which kstyle's previews read as plain text, as diffusers does",
                i + 1
            );
        }
    }
    if previews && sample_prompts.is_empty() {
        anyhow::bail!(
            "--sample-every, --sample-every-n-epochs and --sample-at-first need \
             --sample-prompt TEXT or --sample-prompts FILE"
        );
    }
    Ok(sample_prompts)
}
