//! Reading ahead the pictures that every visit cuts anew (`--random-crop`, `--color-aug`): their
//! decode and scaling, the host's share of such a visit, run on a background thread for the
//! coming batches of the epoch while the device trains on the current ones.
//!
//! What is read does not depend on the run's random draws (the window, mirror and colour shift
//! are applied afterwards, on the training thread), so reading ahead changes no result: a visit
//! whose picture was not asked for ahead (the first batches of an epoch, whose order is drawn
//! when the epoch begins) reads it itself, the same way.

use super::buckets::Placement;
use super::data::{scale_mask, Role};
use super::examples::{load_with_mask, LivePicture, Reading};
use crate::image::io::resize_crop_at;
use crate::{Error, Result};
use image::{GrayImage, RgbImage};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// A live picture as a visit cuts it: scaled to its placement's `resized` size.
pub(super) struct Loaded {
    pub(super) picture: RgbImage,
    /// The loss mask's source (alpha or mask picture), scaled likewise.
    pub(super) alpha: Option<GrayImage>,
    /// The file's size before scaling (the time ids' original size).
    pub(super) orig: (u32, u32),
}

/// Reads `live`'s file (a `role` picture) and scales it (and its mask source) to the placement's
/// `resized` size, as [`super::data::training_tensor`] scales it before cutting the window.
pub(super) fn load(live: &LivePicture, read: &Reading, role: Role) -> Result<Loaded> {
    let (picture, alpha) = load_with_mask(read, &live.path, role)?;
    let orig = picture.dimensions();
    let scaled = |img: &RgbImage| -> Result<RgbImage> {
        // The whole scaled picture: a window as large as it, at its corner.
        let place: Placement = live.place;
        Ok(resize_crop_at(img, place.resized, place.resized, Some((0, 0)))?.0)
    };
    let stale = |e: Error| {
        Error::file(
            &live.path,
            format!("{e} (has it changed since the run began?)"),
        )
    };
    let picture = scaled(&picture).map_err(stale)?;
    let (resized, at) = (live.place.resized, Some((0, 0)));
    let alpha = match alpha {
        Some(a) => Some(scale_mask(&a, resized, resized, at).map_err(stale)?),
        None => None,
    };
    Ok(Loaded {
        picture,
        alpha,
        orig,
    })
}

/// Which visit a read is for: (epoch, batch position in the epoch, place in the batch).
pub(super) type VisitKey = (u64, usize, usize);

struct Job {
    key: VisitKey,
    live: Arc<LivePicture>,
    role: Role,
}

type Slots = Arc<(Mutex<HashMap<VisitKey, Option<Result<Loaded>>>>, Condvar)>;

/// One background thread reading the pictures asked for, in order.
pub(super) struct Prefetcher {
    jobs: Option<mpsc::Sender<Job>>,
    slots: Slots,
    stop: Arc<AtomicBool>,
    worker: Option<JoinHandle<()>>,
}

impl Prefetcher {
    pub(super) fn new(read: Reading) -> Prefetcher {
        let (jobs, rx) = mpsc::channel::<Job>();
        let slots: Slots = Arc::new((Mutex::new(HashMap::new()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let worker = {
            let (slots, stop) = (slots.clone(), stop.clone());
            std::thread::spawn(move || {
                for job in rx {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let loaded = load(&job.live, &read, job.role);
                    let (map, ready) = &*slots;
                    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
                    map.insert(job.key, Some(loaded));
                    ready.notify_all();
                }
            })
        };
        Prefetcher {
            jobs: Some(jobs),
            slots,
            stop,
            worker: Some(worker),
        }
    }

    /// Asks for `live`'s picture for the visit `key` (once per key).
    pub(super) fn request(&self, key: VisitKey, live: Arc<LivePicture>, role: Role) {
        let (map, _) = &*self.slots;
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(&key) {
            return;
        }
        map.insert(key, None);
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|j| j.send(Job { key, live, role }).is_ok());
        if !sent {
            // The worker is gone: the visit reads the picture itself.
            map.remove(&key);
        }
    }

    /// The picture read for visit `key`, waiting for it if it is on its way; None when it was
    /// never asked for.
    pub(super) fn take(&self, key: VisitKey) -> Option<Result<Loaded>> {
        let (map, ready) = &*self.slots;
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match map.get(&key) {
                None => return None,
                Some(Some(_)) => return map.remove(&key).flatten(),
                Some(None) => {
                    if self.worker.as_ref().is_none_or(|w| w.is_finished()) {
                        map.remove(&key);
                        return None;
                    }
                    map = ready.wait(map).unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.jobs = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::TempDir;
    use crate::Device;
    use std::path::PathBuf;

    fn live(path: PathBuf) -> Arc<LivePicture> {
        Arc::new(LivePicture {
            path,
            place: Placement::cover(90, 50, (64, 32)),
            random_crop: true,
            color_aug: false,
        })
    }

    #[test]
    fn read_ahead_gives_what_a_visit_reads_itself() {
        let dir = TempDir::new("prefetch");
        let path = dir.path().join("p.png");
        RgbImage::from_fn(90, 50, |x, y| image::Rgb([(x * 2) as u8, (y * 5) as u8, 7]))
            .save(&path)
            .unwrap();
        let read = Reading {
            alpha_mask: false,
            mask_data: None,
            device: Device::Cpu,
        };
        let pic = live(path);
        let direct = load(&pic, &read, Role::Style).unwrap();
        assert_eq!(direct.orig, (90, 50));
        assert_eq!(direct.picture.dimensions(), pic.place.resized);
        let p = Prefetcher::new(read.clone());
        // The same picture for several visits, and a missing file among them.
        let gone = live(dir.path().join("gone.png"));
        for pos in 0..4 {
            p.request((0, pos, 0), pic.clone(), Role::Style);
        }
        p.request((0, 4, 0), gone, Role::Style);
        p.request((0, 0, 0), pic.clone(), Role::Style); // asked twice: read once
        for pos in 0..4 {
            let got = p.take((0, pos, 0)).unwrap().unwrap();
            assert_eq!(got.picture, direct.picture);
            assert_eq!(got.orig, direct.orig);
            assert!(got.alpha.is_none());
            // Taken: a second take finds nothing.
            assert!(p.take((0, pos, 0)).is_none());
        }
        let err = p.take((0, 4, 0)).unwrap().err().unwrap().to_string();
        assert!(err.contains("gone.png"), "{err}");
        assert!(p.take((1, 0, 0)).is_none(), "never asked for");
    }
}
