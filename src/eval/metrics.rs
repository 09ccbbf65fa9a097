//! Embedding metrics over CLIP features (`ClipModel::get_{image,text}_features`).
//!
//! - CSS (cultural similarity score): per image, the largest cosine similarity between its
//!   embedding and any concept embedding; the score of a set is the mean over images.
//! - CLIP score: per image, the cosine similarity between its embedding and the embedding of the
//!   prompt it was generated from. Reported as the plain cosine, which is what the references
//!   hold; torchmetrics' `CLIPScore` shows `100 * max(cos, 0)`, a presentation choice left to
//!   the caller.
//!
//! Every function normalises its inputs itself (`F.normalize`, eps 1e-12), so raw projected
//! features and already-normalised ones give the same result.

use crate::{Error, Result, Tensor};

/// `torch.nn.functional.normalize`'s default eps.
const NORM_EPS: f64 = 1e-12;

fn check_embeds(op: &'static str, a: &Tensor, b: &Tensor) -> Result<(usize, usize)> {
    let (n, p) = a.dims2()?;
    let (m, q) = b.dims2()?;
    if p != q || n == 0 || m == 0 {
        return Err(Error::ShapeMismatch {
            op,
            lhs: a.shape().clone(),
            rhs: b.shape().clone(),
        });
    }
    Ok((n, m))
}

/// Cosine similarity of every row of `a` (N, P) with every row of `b` (M, P): (N, M).
pub fn cosine_matrix(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_embeds("cosine_matrix", a, b)?;
    let a = a.normalize_l2(1, NORM_EPS)?; // (N, P)
    let b = b.normalize_l2(1, NORM_EPS)?; // (M, P)
    a.matmul(&b.t()?) // (N, M)
}

/// Per image, the best cosine against any concept: images (N, P), concepts (C, P) -> (N).
pub fn css_per_image(image_embeds: &Tensor, concept_embeds: &Tensor) -> Result<Tensor> {
    cosine_matrix(image_embeds, concept_embeds)?.max(1) // (N)
}

/// The mean of [`css_per_image`]: a scalar tensor.
pub fn css(image_embeds: &Tensor, concept_embeds: &Tensor) -> Result<Tensor> {
    css_per_image(image_embeds, concept_embeds)?.mean_all()
}

/// Per image, the cosine with its own prompt: images (N, P), texts (N, P) or one text (1, P)
/// shared by all images -> (N).
pub fn clip_score_per_image(image_embeds: &Tensor, text_embeds: &Tensor) -> Result<Tensor> {
    let (n, m) = check_embeds("clip_score_per_image", image_embeds, text_embeds)?;
    if m != n && m != 1 {
        return Err(Error::ShapeMismatch {
            op: "clip_score_per_image",
            lhs: image_embeds.shape().clone(),
            rhs: text_embeds.shape().clone(),
        });
    }
    let a = image_embeds.normalize_l2(1, NORM_EPS)?; // (N, P)
    let b = text_embeds.normalize_l2(1, NORM_EPS)?; // (N or 1, P)
    a.mul(&b)?.sum(&[1]) // (N)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    fn t(v: &[f64], shape: (usize, usize)) -> Tensor {
        Tensor::from_slice(v, shape, Device::Cpu).unwrap()
    }

    #[test]
    fn scores_on_hand_made_embeddings() {
        // Image 0 points along x, image 1 halfway between x and y (unnormalised on purpose).
        let imgs = t(&[2.0, 0.0, 1.0, 1.0], (2, 2));
        let concepts = t(&[0.0, 3.0, 1.0, 0.0], (2, 2));
        let per = css_per_image(&imgs, &concepts)
            .unwrap()
            .to_vec_f64()
            .unwrap();
        let h = std::f64::consts::FRAC_1_SQRT_2;
        assert!((per[0] - 1.0).abs() < 1e-12 && (per[1] - h).abs() < 1e-12);
        let mean = css(&imgs, &concepts).unwrap().to_scalar().unwrap();
        assert!((mean - (1.0 + h) / 2.0).abs() < 1e-12);
        let texts = t(&[0.0, 1.0, -1.0, -1.0], (2, 2));
        let cs = clip_score_per_image(&imgs, &texts)
            .unwrap()
            .to_vec_f64()
            .unwrap();
        assert!(cs[0].abs() < 1e-12 && (cs[1] + 1.0).abs() < 1e-12);
        let one = clip_score_per_image(&imgs, &t(&[1.0, 0.0], (1, 2))).unwrap();
        assert_eq!(one.dims(), &[2]);
        assert!(clip_score_per_image(&imgs, &t(&[1.0; 6], (3, 2))).is_err());
        assert!(css(&imgs, &t(&[1.0; 3], (1, 3))).is_err());
    }
}
