//! Sessions with the token: a pool of open sessions, logging in (again when the token forgot
//! the login; a PIN the token refused stops further attempts, so the token is not locked),
//! and finding a key's object again when its handle went stale. It never signs or creates
//! anything itself.

use super::*;

impl Inner {
    /// A new session, logged in as the user (the token may have forgotten the login with its
    /// last session; a login another session holds already is fine).
    pub(super) fn open_session(&self) -> Result<Session> {
        let session = self
            .ctx
            .open_rw_session(self.slot)
            .map_err(p11("C_OpenSession"))?;
        self.login(&session)?;
        Ok(session)
    }

    /// Logs the application in as the user on `s` (a login is the application's, shared by
    /// its sessions; one held already is fine).
    pub(super) fn login(&self, s: &Session) -> Result<()> {
        use cryptoki::error::{Error as E, RvError as R};
        use std::sync::atomic::Ordering;
        let refused = || {
            Error::Config(
                "pkcs11: the token refused the user PIN; no more logins are tried (they would \
                 count toward locking it) until user_pin is fixed and the server restarted"
                    .into(),
            )
        };
        if self.pin_refused.load(Ordering::SeqCst) {
            return Err(refused());
        }
        let pin = AuthPin::new(self.pin.expose().into());
        match s.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(E::Pkcs11(R::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(E::Pkcs11(
                R::PinIncorrect | R::PinLocked | R::PinExpired | R::PinInvalid | R::PinLenRange,
                _,
            )) => {
                self.pin_refused.store(true, Ordering::SeqCst);
                Err(refused())
            }
            Err(e) => Err(p11("C_Login")(e)),
        }
    }

    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Records that `e`'s private key is `private` in `epoch`, if the index still names
    /// that instance (no rotation meanwhile).
    pub(super) fn refresh(&self, e: &Entry, private: ObjectHandle, epoch: u64) {
        self.keys.update_if(&e.public.id, |c| {
            if c.instance != e.instance {
                return false;
            }
            c.private = private;
            c.epoch = epoch;
            true
        });
    }

    /// Runs `f` with a pooled session (opening one when none is free). A session that saw
    /// the token fail is not reused, nor is any other pooled one: they share its fate.
    pub(super) fn with_session<T>(&self, f: impl FnOnce(&Session) -> Result<T>) -> Result<T> {
        self.with_session_from(false, f).1
    }

    /// As [`Inner::with_session`], and when a pooled session turns out dead, once more on a
    /// fresh one: for calls that may safely run twice (signatures, reads).
    pub(super) fn with_session_retrying<T>(&self, f: impl Fn(&Session) -> Result<T>) -> Result<T> {
        match self.with_session_from(false, &f) {
            (true, Err(Error::Unavailable(_))) => self.with_session_from(true, &f).1,
            (_, r) => r,
        }
    }

    /// Runs `f` on a pooled session, or a fresh one when `fresh` or none is pooled; returns
    /// whether the session was a pooled one, and `f`'s result.
    pub(super) fn with_session_from<T>(
        &self,
        fresh: bool,
        f: impl FnOnce(&Session) -> Result<T>,
    ) -> (bool, Result<T>) {
        let pooled = if fresh {
            None
        } else {
            match self.sessions.lock() {
                Ok(mut pool) => pool.pop(),
                Err(_) => {
                    return (
                        false,
                        Err(Error::Backend("PKCS#11 session pool poisoned".into())),
                    );
                }
            }
        };
        let was_pooled = pooled.is_some();
        let session = match pooled {
            Some(s) => s,
            None => match self.open_session() {
                Ok(s) => s,
                Err(e) => return (false, Err(e)),
            },
        };
        let r = f(&session);
        match (&r, self.sessions.lock()) {
            (Err(Error::Unavailable(_)), Ok(mut pool)) => {
                pool.clear();
                self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            (_, Ok(mut pool)) if pool.len() < 8 => pool.push(session),
            _ => {}
        }
        (was_pooled, r)
    }

    /// The private key object of `e` found again by its label and tag (after the token
    /// restarted, its handle may have changed).
    pub(super) fn relocate(&self, s: &Session, e: &Entry) -> Result<ObjectHandle> {
        let tag = hex::decode(&e.instance)
            .map_err(|_| Error::Backend(format!("bad instance {:?}", e.instance)))?;
        let found = s
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(self.label(&e.public.id).into_bytes()),
                Attribute::Id(tag),
            ])
            .map_err(p11("C_FindObjects(private key)"))?;
        found
            .first()
            .copied()
            .ok_or_else(|| Error::NotFound(e.public.id.clone()))
    }
}
