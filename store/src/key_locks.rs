//! Locks chosen by a key's hash, for reads followed by writes of the same
//! records within this process.

use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// How many locks the keys share.
const LOCKS: usize = 64;

/// A fixed set of locks, one picked by a key's hash: whoever reads a record
/// and then writes it holds the lock of the record's key (or of a key every
/// record it touches shares, such as their account) from the read to the
/// write, so that this process's writers of that key go one at a time while
/// writers of other keys go on. Keys whose hashes pick the same lock only
/// wait for one another. (One lock for every key makes every worker thread
/// but one wait on it.)
#[derive(Debug)]
pub struct KeyLocks([Mutex<()>; LOCKS]);

impl KeyLocks {
    /// The locks, none held; `const`, so a set can be a static shared by
    /// every instance of a record store in the process.
    pub const fn new() -> Self {
        Self([const { Mutex::new(()) }; LOCKS])
    }

    /// Holds `key`'s lock until the guard is dropped.
    pub fn lock(&self, key: &[u8]) -> MutexGuard<'_, ()> {
        let hash =
            std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
                .hash_one(key);
        self.0[(hash % LOCKS as u64) as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for KeyLocks {
    fn default() -> Self {
        Self::new()
    }
}
