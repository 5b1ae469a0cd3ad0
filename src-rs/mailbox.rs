//! Settles promises of one JS thread in bulk. Core callbacks (commit done, lock granted, key
//! leased) arrive on the writer thread or wherever a lock is handed on; each is posted here, and
//! only the post into an empty mailbox wakes the JS thread. One wake-up then settles everything
//! queued, so a batch of commits costs one thread-safe call, not one per promise.

use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use kvstore_core::{Grant, LockMode, LockedEntry, MapStore, WatchNext};
use napi::bindgen_prelude::{BufferSlice, JsError, Null, ToNapiValue};
use napi::{sys, Env, Error, Result, Status};

use crate::{js_error, pack_events, to_js_locked, View, WatchState, WATCH_BATCH};

/// A promise's resolver; resolved only on the JS thread that made it.
pub struct Deferred(sys::napi_deferred);

// SAFETY: the handle is only moved across threads; it is used on its own JS thread (in `drain`).
unsafe impl Send for Deferred {}

/// A grant on its way to a JS thread. If it is dropped instead of delivered (the thread is gone,
/// a terminated worker, the view it was asked through closed), the lock is released so nobody
/// waits forever.
pub struct PendingGrant {
    pub map: MapStore,
    pub key: String,
    pub grant: Option<Grant>,
    pub view: Arc<View>,
}

impl PendingGrant {
    fn finish(mut self, mode: LockMode) -> kvstore_core::Result<LockedEntry> {
        if self.view.is_closed() {
            // Dropped: the lock passes on.
            return Err(kvstore_core::Error::StoreClosed);
        }
        let grant = self.grant.take().expect("finished once");
        self.map.finish_acquire(&self.key, grant, mode)
    }
}

impl Drop for PendingGrant {
    fn drop(&mut self) {
        if let Some(grant) = self.grant.take() {
            let _ = self.map.release(&self.key, grant.token);
        }
    }
}

pub enum Settlement {
    Committed(Deferred, kvstore_core::Result<()>),
    Granted(Deferred, PendingGrant, LockMode),
    NotGranted(Deferred, kvstore_core::Error),
    Key(Deferred, kvstore_core::Result<String>),
    Flag(Deferred, kvstore_core::Result<bool>),
    /// A watch's parked `next()`: settled with what the watch holds when it is drained.
    Watch(Deferred, Arc<WatchState>),
}

/// A promise's deferred that settles exactly once: through the core's callback, or through
/// `refuse` when the core turns the call down before taking the callback.
pub struct SettleOnce {
    slot: Arc<Mutex<Option<Deferred>>>,
    mailbox: Arc<Mailbox>,
}

impl SettleOnce {
    pub fn new(mailbox: &Arc<Mailbox>, deferred: Deferred) -> Self {
        SettleOnce {
            slot: Arc::new(Mutex::new(Some(deferred))),
            mailbox: mailbox.clone(),
        }
    }

    fn take(slot: &Mutex<Option<Deferred>>) -> Option<Deferred> {
        slot.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The callback to hand to the core; `settlement` wraps its outcome.
    pub fn callback<T: 'static>(
        &self,
        settlement: fn(Deferred, kvstore_core::Result<T>) -> Settlement,
    ) -> Box<dyn FnOnce(kvstore_core::Result<T>) + Send> {
        let slot = self.slot.clone();
        let mailbox = self.mailbox.clone();
        Box::new(move |outcome| {
            if let Some(deferred) = Self::take(&slot) {
                mailbox.post(settlement(deferred, outcome));
            }
        })
    }

    /// The core refused the call: reject with `err`, unless the callback settled already.
    pub fn refuse<T>(
        &self,
        settlement: fn(Deferred, kvstore_core::Result<T>) -> Settlement,
        err: kvstore_core::Error,
    ) {
        if let Some(deferred) = Self::take(&self.slot) {
            self.mailbox.post(settlement(deferred, Err(err)));
        }
    }
}

#[derive(Default)]
struct Queue {
    items: Vec<Settlement>,
    /// The handle closed: no new promises; the thread-safe function goes once all settled.
    closing: bool,
    /// The thread-safe function is released (or its JS thread is gone): nothing is delivered.
    closed: bool,
}

struct Tsfn(sys::napi_threadsafe_function);

// SAFETY: thread-safe functions are made to be called from any thread.
unsafe impl Send for Tsfn {}
unsafe impl Sync for Tsfn {}

pub struct Mailbox {
    queue: Mutex<Queue>,
    tsfn: OnceLock<Tsfn>,
    /// Promises made and not yet settled; touched on the JS thread only. While non-zero the
    /// mailbox keeps the event loop alive.
    pending: AtomicU32,
}

impl Mailbox {
    pub fn new(env: &Env) -> Result<Arc<Mailbox>> {
        let mailbox = Arc::new(Mailbox {
            queue: Mutex::new(Queue::default()),
            tsfn: OnceLock::new(),
            pending: AtomicU32::new(0),
        });
        let context = Arc::into_raw(mailbox.clone()) as *mut c_void;
        let mut tsfn = ptr::null_mut();
        // SAFETY: creating a string on the current JS thread.
        let name = unsafe { String::to_napi_value(env.raw(), "kvstore".to_string())? };
        // SAFETY: plain N-API calls on the current JS thread with valid arguments; `context`
        // is a leaked Arc reclaimed in `finalize`.
        let status = unsafe {
            sys::napi_create_threadsafe_function(
                env.raw(),
                ptr::null_mut(),
                ptr::null_mut(),
                name,
                0,
                1,
                context,
                Some(finalize),
                context,
                Some(call_js),
                &mut tsfn,
            )
        };
        if status != sys::Status::napi_ok {
            // SAFETY: the tsfn was not created, so `finalize` will never reclaim the Arc.
            drop(unsafe { Arc::from_raw(context as *const Mailbox) });
            return Err(Error::new(
                Status::GenericFailure,
                "could not create a thread-safe function",
            ));
        }
        // SAFETY: `tsfn` was just created on this thread.
        unsafe { sys::napi_unref_threadsafe_function(env.raw(), tsfn) };
        let _ = mailbox.tsfn.set(Tsfn(tsfn));
        Ok(mailbox)
    }

    fn tsfn(&self) -> sys::napi_threadsafe_function {
        self.tsfn.get().map_or(ptr::null_mut(), |t| t.0)
    }

    /// JS thread: a new promise to be settled through this mailbox.
    pub fn promise(&self, env: &Env) -> Result<(Deferred, sys::napi_value)> {
        if self.queue().closing {
            return Err(js_error(kvstore_core::Error::StoreClosed));
        }
        let mut deferred = ptr::null_mut();
        let mut promise = ptr::null_mut();
        // SAFETY: N-API call on the current JS thread.
        let status = unsafe { sys::napi_create_promise(env.raw(), &mut deferred, &mut promise) };
        if status != sys::Status::napi_ok {
            return Err(Error::new(
                Status::GenericFailure,
                "could not create a promise",
            ));
        }
        if self.pending.fetch_add(1, Ordering::Relaxed) == 0 {
            // SAFETY: JS thread; keeps the loop alive while a promise is outstanding.
            unsafe { sys::napi_ref_threadsafe_function(env.raw(), self.tsfn()) };
        }
        Ok((Deferred(deferred), promise))
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Any thread: queue a settlement; wake the JS thread if it is not already due to drain.
    pub fn post(&self, settlement: Settlement) {
        let dropped = {
            let mut queue = self.queue();
            if queue.closed {
                // Dropped outside the lock: a PendingGrant releases its lock on drop.
                vec![settlement]
            } else {
                let ring = queue.items.is_empty();
                queue.items.push(settlement);
                // Called under the lock, so `close`/`finalize` cannot free the function between
                // the check above and this call. Non-blocking: it only queues a wake-up.
                // SAFETY: the function is live while `closed` is false.
                let failed = ring
                    && unsafe {
                        sys::napi_call_threadsafe_function(
                            self.tsfn(),
                            ptr::null_mut(),
                            sys::ThreadsafeFunctionCallMode::nonblocking,
                        )
                    } != sys::Status::napi_ok;
                if failed {
                    // The JS thread is going away: nothing more will be delivered.
                    queue.closed = true;
                    std::mem::take(&mut queue.items)
                } else {
                    Vec::new()
                }
            }
        };
        drop(dropped);
    }

    /// The JS thread is gone: nothing more will be delivered; queued grants are released.
    fn abandon(&self) {
        let items = {
            let mut queue = self.queue();
            queue.closed = true;
            std::mem::take(&mut queue.items)
        };
        drop(items);
    }

    /// JS thread: settle everything queued; once closing and nothing is outstanding, let go of
    /// the thread-safe function.
    pub fn drain(&self, env: sys::napi_env) {
        let items = std::mem::take(&mut self.queue().items);
        let settled = items.len() as u32;
        for item in items {
            // SAFETY: `env` is the JS thread that made each deferred.
            unsafe { settle(env, item) };
        }
        let outstanding = if settled > 0 {
            let left = self.pending.fetch_sub(settled, Ordering::Relaxed) - settled;
            if left == 0 {
                // SAFETY: JS thread; nothing outstanding, let the loop exit.
                unsafe { sys::napi_unref_threadsafe_function(env, self.tsfn()) };
            }
            left
        } else {
            self.pending.load(Ordering::Relaxed)
        };
        if outstanding == 0 {
            let mut queue = self.queue();
            if queue.closing && !queue.closed && queue.items.is_empty() {
                queue.closed = true;
                // SAFETY: releases the one thread count taken at creation, under the lock that
                // posters check; `finalize` runs later.
                unsafe {
                    sys::napi_release_threadsafe_function(
                        self.tsfn(),
                        sys::ThreadsafeFunctionReleaseMode::release,
                    )
                };
            }
        }
    }

    /// JS thread, at close: deliver what is queued now; promises still outstanding (a backup,
    /// a lock handed over at this moment) are settled when they come, then the mailbox stops.
    pub fn close(&self, env: &Env) {
        self.queue().closing = true;
        self.drain(env.raw());
    }
}

unsafe fn settle(env: sys::napi_env, item: Settlement) {
    let (deferred, outcome): (Deferred, Result<sys::napi_value>) = match item {
        Settlement::Committed(d, outcome) => (
            d,
            outcome
                .map_err(js_error)
                .and_then(|()| <()>::to_napi_value(env, ())),
        ),
        Settlement::Granted(d, grant, mode) => (
            d,
            grant
                .finish(mode)
                .map_err(js_error)
                .and_then(|locked| ToNapiValue::to_napi_value(env, to_js_locked(locked))),
        ),
        Settlement::NotGranted(d, err) => (d, Err(js_error(err))),
        Settlement::Key(d, outcome) => (
            d,
            outcome
                .map_err(js_error)
                .and_then(|key| String::to_napi_value(env, key)),
        ),
        Settlement::Flag(d, outcome) => (
            d,
            outcome
                .map_err(js_error)
                .and_then(|flag| bool::to_napi_value(env, flag)),
        ),
        Settlement::Watch(d, state) => {
            state.waiting.store(false, Ordering::SeqCst);
            let outcome = match state.watcher.try_next(WATCH_BATCH) {
                WatchNext::Changes(events) => {
                    BufferSlice::copy_from(&Env::from_raw(env), pack_events(&events))
                        .and_then(|b| BufferSlice::to_napi_value(env, b))
                }
                // Woken with nothing to read: an empty batch, and the reader asks again.
                WatchNext::Pending => BufferSlice::copy_from(&Env::from_raw(env), [])
                    .and_then(|b| BufferSlice::to_napi_value(env, b)),
                WatchNext::Ended => Null::to_napi_value(env, Null),
                WatchNext::Failed(err) => Err(js_error(err)),
            };
            (d, outcome)
        }
    };
    match outcome {
        Ok(value) => {
            sys::napi_resolve_deferred(env, deferred.0, value);
        }
        Err(err) => {
            let value = JsError::from(err).into_value(env);
            sys::napi_reject_deferred(env, deferred.0, value);
        }
    }
}

unsafe extern "C" fn call_js(
    env: sys::napi_env,
    _js_callback: sys::napi_value,
    context: *mut c_void,
    _data: *mut c_void,
) {
    if env.is_null() || context.is_null() {
        return;
    }
    let mailbox = &*(context as *const Mailbox);
    mailbox.drain(env);
}

unsafe extern "C" fn finalize(_env: sys::napi_env, data: *mut c_void, _hint: *mut c_void) {
    let mailbox = Arc::from_raw(data as *const Mailbox);
    mailbox.abandon();
}
