//! Independent simulation runs on a few threads: each thread takes the next
//! item until none is left, and the results come back in the items' order
//! whatever the threads did.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// `run` over every item of `items` on at most `threads` threads, the
/// results in the items' order (None only where a run did not finish).
pub fn map_in_order<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    run: &(dyn Fn(&T) -> R + Sync),
) -> Vec<Option<R>> {
    let next = AtomicUsize::new(0);
    let slots: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, items.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= items.len() {
                        break;
                    }
                    let result = run(&items[index]);
                    if let Ok(mut slots) = slots.lock() {
                        slots[index] = Some(result);
                    }
                }
            });
        }
    });
    slots.into_inner().unwrap_or_default()
}
