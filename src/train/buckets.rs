//! Aspect-ratio buckets, and where a training picture goes: the bucket (width, height) it
//! trains at and the size it is scaled to before the centre crop takes the bucket from it.
//!
//! Three ways, per dataset: square crops at the resolution; kstyle's buckets (`--buckets`);
//! kohya's (`--buckets` with `--min-bucket-reso`, `--max-bucket-reso`, `--bucket-reso-steps` or
//! `--bucket-no-upscale`, a dataset config's keys of those names): kohya's list of sizes and its
//! choice among them (the exact size when listed, else the smallest aspect-ratio difference,
//! the first in sorted order on a tie), or with `no_upscale` a bucket of each picture's own size
//! (scaled down to the resolution's area when larger), in steps, cropped rather than stretched.

use super::subsets::Names;
use crate::image::io::cover_size;

/// How a dataset sizes its pictures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bucketing {
    /// Square centre crops at the resolution.
    Off,
    /// kstyle's buckets (see [`buckets`]).
    Kstyle,
    /// kohya's.
    Kohya(KohyaBuckets),
}

/// kohya's bucket settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KohyaBuckets {
    /// Shortest and longest bucket side (kohya's `min_bucket_reso` / `max_bucket_reso`).
    pub min: usize,
    pub max: usize,
    /// Bucket sides are multiples of this (`bucket_reso_steps`).
    pub steps: usize,
    /// A bucket per picture size, never scaled up (`bucket_no_upscale`).
    pub no_upscale: bool,
}

impl Default for KohyaBuckets {
    /// kohya's defaults: 256 to 1024 in steps of 64, scaled up as needed.
    fn default() -> KohyaBuckets {
        KohyaBuckets {
            min: 256,
            max: 1024,
            steps: 64,
            no_upscale: false,
        }
    }
}

impl Names {
    fn bucket(self, key: &str) -> String {
        match self {
            Names::Flags => format!("--{}", key.replace('_', "-")),
            Names::ConfigKeys => key.to_string(),
        }
    }
}

impl KohyaBuckets {
    /// Settings that cannot make buckets for `resolution`, in `names`' words.
    pub fn check(&self, resolution: usize, names: Names) -> Result<(), String> {
        let n = |k: &str| names.bucket(k);
        if self.steps == 0 || self.steps % 8 != 0 {
            return Err(format!(
                "{} must be a positive multiple of 8, got {} (latent sides are pixels / 8)",
                n("bucket_reso_steps"),
                self.steps
            ));
        }
        if self.no_upscale {
            // Only the area bounds the buckets.
            return Ok(());
        }
        for (key, v) in [("min_bucket_reso", self.min), ("max_bucket_reso", self.max)] {
            if v == 0 || v % self.steps != 0 {
                return Err(format!(
                    "{} must be a positive multiple of {} {}, got {v}",
                    n(key),
                    n("bucket_reso_steps"),
                    self.steps
                ));
            }
        }
        if self.min > self.max || self.max < resolution {
            return Err(format!(
                "{} {} and {} {} must satisfy min <= max and max >= the resolution {resolution}",
                n("min_bucket_reso"),
                self.min,
                n("max_bucket_reso"),
                self.max
            ));
        }
        Ok(())
    }

    /// kohya's bucket sizes for a square `resolution`: the largest square in steps of that
    /// area, and every width from `min` to `max` in steps with the tallest height in steps
    /// (at most `max`) whose area stays within the resolution's, both ways round when that
    /// height is at least `min`; sorted.
    pub fn list(&self, resolution: usize) -> Vec<(usize, usize)> {
        let area = resolution * resolution;
        let step = self.steps;
        let side = ((area as f64).sqrt() as usize) / step * step;
        let mut out = vec![(side, side)];
        let mut w = self.min;
        while w <= self.max {
            let h = self.max.min(area / w / step * step);
            if h >= self.min {
                out.push((w, h));
                out.push((h, w));
            }
            w += step;
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// kohya's bucket of a `w x h` picture with `bucket_no_upscale`, and the size it is scaled
    /// to: its own size, or when larger than the resolution's area that area at its aspect
    /// with one side rounded to steps (the one whose rounding keeps the aspect better); the
    /// bucket is that size floored to steps. None when a side is below one step.
    fn own_size(&self, resolution: usize, w: u32, h: u32) -> Option<((usize, usize), (u32, u32))> {
        let area = (resolution * resolution) as f64;
        let step = self.steps as i64;
        let round = |x: f64| {
            let x = (x + 0.5) as i64;
            x - x % step
        };
        let aspect = w as f64 / h as f64;
        let resized = match w as f64 * h as f64 > area {
            false => (w, h),
            true => {
                let rw = (area * aspect).sqrt();
                let rh = area / rw;
                let w_rounded = round(rw);
                let h_in_w = round(w_rounded as f64 / aspect);
                let h_rounded = round(rh);
                let w_in_h = round(h_rounded as f64 * aspect);
                let by_width = w_rounded as f64 / h_in_w as f64;
                let by_height = w_in_h as f64 / h_rounded as f64;
                match (by_width - aspect).abs() < (by_height - aspect).abs() {
                    true => (w_rounded as u32, (w_rounded as f64 / aspect + 0.5) as u32),
                    false => ((h_rounded as f64 * aspect + 0.5) as u32, h_rounded as u32),
                }
            }
        };
        let floor = |x: u32| x as usize - x as usize % self.steps;
        let bucket = (floor(resized.0), floor(resized.1));
        (bucket.0 > 0 && bucket.1 > 0).then_some((bucket, resized))
    }
}

/// Where a picture trains: its bucket (width, height), the size it is scaled to first, and where
/// the bucket's window lies in the scaled picture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub bucket: (usize, usize),
    pub resized: (u32, u32),
    /// The window's top-left corner (left, top) in the scaled picture: None is the centre
    /// (margins floored), Some a random crop's draw.
    pub at: Option<(u32, u32)>,
}

impl Placement {
    /// A `w x h` picture at `bucket`, scaled to cover it, the window centred.
    pub fn cover(w: u32, h: u32, bucket: (usize, usize)) -> Placement {
        Placement {
            bucket,
            resized: cover_size(w, h, bucket.0 as u32, bucket.1 as u32),
            at: None,
        }
    }

    /// How far the window can move (columns, rows): the scaled picture's size past the
    /// bucket's.
    pub fn slack(&self) -> (u32, u32) {
        let (w, h) = (self.bucket.0 as u32, self.bucket.1 as u32);
        (
            self.resized.0.saturating_sub(w),
            self.resized.1.saturating_sub(h),
        )
    }
}

/// A dataset's bucketing, its bucket list made once.
#[derive(Clone, Debug)]
pub struct Bucketer {
    resolution: usize,
    bucketing: Bucketing,
    list: Vec<(usize, usize)>,
}

impl Bucketer {
    pub fn new(resolution: usize, bucketing: Bucketing) -> Bucketer {
        let list = match bucketing {
            Bucketing::Off => vec![(resolution, resolution)],
            Bucketing::Kstyle => buckets(resolution),
            Bucketing::Kohya(k) if k.no_upscale => Vec::new(),
            Bucketing::Kohya(k) => k.list(resolution),
        };
        Bucketer {
            resolution,
            bucketing,
            list,
        }
    }

    /// Where a `w x h` picture trains; an error when it is too small for any bucket.
    pub fn place(&self, w: u32, h: u32) -> Result<Placement, String> {
        let bucket = match self.bucketing {
            Bucketing::Off | Bucketing::Kstyle => {
                nearest_bucket(w as usize, h as usize, &self.list)
            }
            Bucketing::Kohya(k) if k.no_upscale => {
                let (bucket, resized) = k.own_size(self.resolution, w, h).ok_or_else(|| {
                    format!(
                        "{w}x{h} is smaller than one bucket step ({} px) on a side",
                        k.steps
                    )
                })?;
                return Ok(Placement {
                    bucket,
                    resized,
                    at: None,
                });
            }
            Bucketing::Kohya(_) => {
                let own = (w as usize, h as usize);
                match self.list.contains(&own) {
                    true => own,
                    false => {
                        let aspect = w as f64 / h as f64;
                        let error = |b: &(usize, usize)| (b.0 as f64 / b.1 as f64 - aspect).abs();
                        let mut best = self.list[0];
                        for b in &self.list[1..] {
                            if error(b) < error(&best) {
                                best = *b;
                            }
                        }
                        best
                    }
                }
            }
        };
        Ok(Placement::cover(w, h, bucket))
    }
}

/// kstyle's aspect-ratio buckets for a base resolution: sides multiples of 64, area at most
/// resolution², aspect ratios up to 4:1 either way.
pub fn buckets(resolution: usize) -> Vec<(usize, usize)> {
    let area = resolution * resolution;
    let mut out = Vec::new();
    let mut w = (resolution / 2).max(64) / 64 * 64;
    while w <= resolution * 2 {
        let h = (area / w) / 64 * 64;
        if h >= 64 && w * 4 >= h && h * 4 >= w {
            out.push((w, h));
        }
        w += 64;
    }
    if !out.contains(&(resolution, resolution)) {
        out.push((resolution, resolution));
    }
    out
}

/// The bucket whose aspect ratio is closest to (w, h) in log space.
pub fn nearest_bucket(w: usize, h: usize, buckets: &[(usize, usize)]) -> (usize, usize) {
    let target = (w as f64 / h as f64).ln();
    *buckets
        .iter()
        .min_by(|a, b| {
            let da = ((a.0 as f64 / a.1 as f64).ln() - target).abs();
            let db = ((b.0 as f64 / b.1 as f64).ln() - target).abs();
            da.total_cmp(&db)
        })
        .expect("bucket list is never empty")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kohya(min: usize, max: usize, steps: usize, no_upscale: bool) -> KohyaBuckets {
        KohyaBuckets {
            min,
            max,
            steps,
            no_upscale,
        }
    }

    /// At kohya's defaults (256 to 1024) a 1024 run's 1024² area never binds: every bucket
    /// has a 1024 side, the other from 256 up in steps of 64.
    #[test]
    fn kohya_lists_at_the_defaults_keep_a_full_side() {
        let list = KohyaBuckets::default().list(1024);
        let mut want: Vec<(usize, usize)> = (4..=16)
            .flat_map(|i| [(64 * i, 1024), (1024, 64 * i)])
            .collect();
        want.sort_unstable();
        want.dedup();
        assert_eq!(list.len(), 25);
        assert_eq!(list, want);
    }

    /// With room to 2048, a width's height is the area's quotient floored to steps.
    #[test]
    fn kohya_lists_floor_the_area_to_steps() {
        let list = kohya(256, 2048, 64, false).list(1024);
        // 1048576 / 640 = 1638.4 -> 1600; / 1088 = 963.8 -> 960; / 512 = 2048.
        for b in [
            (640, 1600),
            (1600, 640),
            (1088, 960),
            (960, 1088),
            (512, 2048),
            (1024, 1024),
        ] {
            assert!(list.contains(&b), "{b:?}");
        }
        assert!(list.iter().all(|&(w, h)| w * h <= 1 << 20
            && w % 64 == 0
            && h % 64 == 0
            && (256..=2048).contains(&w)
            && (256..=2048).contains(&h)));
        assert!(list.windows(2).all(|p| p[0] < p[1]), "sorted, no repeats");
    }

    /// A listed size is its own bucket; otherwise the smallest aspect-ratio difference wins,
    /// and the picture is scaled to cover it.
    #[test]
    fn kohya_places_by_aspect_ratio_difference() {
        let b = Bucketer::new(1024, Bucketing::Kohya(kohya(256, 2048, 64, false)));
        assert_eq!(b.place(640, 1600).unwrap().bucket, (640, 1600));
        // 16:9 = 1.778: 1344x768 (1.75) beats 1280x768 (1.667) and 1408x704 (2.0).
        let p = b.place(1600, 900).unwrap();
        assert_eq!(p.bucket, (1344, 768));
        // 1600 * 768 / 900 = 1365.3.
        assert_eq!(p.resized, (1365, 768));
    }

    /// Without upscaling a picture keeps its size (its bucket floored to steps, cropped from
    /// it) unless its area is past the resolution's; then it is scaled down to that area,
    /// one side rounded to steps.
    #[test]
    fn kohya_no_upscale_buckets_follow_each_picture() {
        let b = Bucketer::new(1024, Bucketing::Kohya(kohya(256, 1024, 64, true)));
        let p = b.place(700, 500).unwrap();
        assert_eq!((p.bucket, p.resized), ((640, 448), (700, 500)));
        // 2:1 at 1024² area: sqrt(2^21) = 1448.2 -> 1408 wide, 704 high either way round.
        let p = b.place(2000, 1000).unwrap();
        assert_eq!((p.bucket, p.resized), ((1408, 704), (1408, 704)));
        let e = b.place(50, 40).unwrap_err();
        assert!(
            e.contains("50x40 is smaller than one bucket step (64 px)"),
            "{e}"
        );
    }

    #[test]
    fn kohya_settings_are_checked() {
        let ok = |k: KohyaBuckets| k.check(1024, Names::Flags);
        assert!(ok(KohyaBuckets::default()).is_ok());
        assert!(ok(kohya(256, 1024, 12, false))
            .unwrap_err()
            .contains("--bucket-reso-steps must be a positive multiple of 8, got 12"));
        assert!(ok(kohya(300, 1024, 64, false))
            .unwrap_err()
            .contains("--min-bucket-reso must be a positive multiple of --bucket-reso-steps 64"));
        assert!(ok(kohya(256, 768, 64, false))
            .unwrap_err()
            .contains("max >= the resolution 1024"));
        // Only the step matters without upscaling.
        assert!(ok(kohya(0, 0, 32, true)).is_ok());
    }
}
