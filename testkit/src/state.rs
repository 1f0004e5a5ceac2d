//! The fake provider's bookkeeping: codes, token families, devices, requests.

use std::collections::{BTreeMap, HashMap};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use crate::{Fault, Recorded};

/// A pending authorization code.
#[derive(Debug, Clone)]
pub(crate) struct Code {
    pub(crate) redirect_uri: String,
    pub(crate) challenge: Option<String>,
    pub(crate) scope: String,
}

/// An authorization request waiting at the login form.
#[derive(Debug, Clone)]
pub(crate) struct PendingLogin {
    pub(crate) redirect_uri: String,
    pub(crate) state: Option<String>,
    pub(crate) challenge: Option<String>,
    pub(crate) scope: String,
}

#[derive(Debug, Default)]
struct Family {
    revoked: bool,
    /// Token responses issued so far for this grant (1 = the login).
    generation: u64,
}

#[derive(Debug)]
struct RefreshEntry {
    family: u64,
    generation: u64,
    rotated_out: bool,
    scope: String,
}

#[derive(Debug)]
struct Device {
    user_code: String,
    approved: bool,
    used: bool,
    scope: String,
}

/// Tokens issued by one grant.
#[derive(Debug)]
pub(crate) struct Issued {
    pub(crate) access_token: String,
    pub(crate) refresh_token: Option<String>,
    pub(crate) scope: String,
    pub(crate) family: u64,
}

/// Why a grant was refused, as an OAuth error code.
pub(crate) type GrantError = &'static str;

#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) requests: Vec<Recorded>,
    pub(crate) token_requests: u64,
    pub(crate) faults: BTreeMap<u64, Fault>,
    pub(crate) refreshes: u64,
    pub(crate) reuse_attempts: u64,
    pub(crate) deny_logins: bool,
    next: u64,
    codes: HashMap<String, Code>,
    pub(crate) logins: HashMap<String, PendingLogin>,
    families: HashMap<u64, Family>,
    refresh: HashMap<String, RefreshEntry>,
    access: HashMap<String, (u64, u64)>,
    devices: HashMap<String, Device>,
}

impl State {
    /// A fresh opaque value: unique per provider, unguessable enough for tests.
    pub(crate) fn fresh(&mut self, prefix: &str) -> String {
        self.next += 1;
        let digest = Sha256::digest(format!("{prefix}/{}/{:p}", self.next, self as *const _));
        format!("{prefix}.{}.{}", self.next, URL_SAFE_NO_PAD.encode(&digest[..12]))
    }

    pub(crate) fn new_code(&mut self, code: Code) -> String {
        let value = self.fresh("code");
        self.codes.insert(value.clone(), code);
        value
    }

    pub(crate) fn take_code(&mut self, code: &str) -> Option<Code> {
        self.codes.remove(code)
    }

    /// Issues tokens for a new grant (a new token family).
    pub(crate) fn issue_new(&mut self, scope: &str, with_refresh: bool) -> Issued {
        self.next += 1;
        let family = self.next;
        self.families.insert(family, Family::default());
        self.issue(family, scope, with_refresh)
    }

    fn issue(&mut self, family: u64, scope: &str, with_refresh: bool) -> Issued {
        let generation = match self.families.get_mut(&family) {
            Some(f) => {
                f.generation += 1;
                f.generation
            }
            None => 0,
        };
        let access_token = self.fresh("at");
        self.access.insert(access_token.clone(), (family, generation));
        let refresh_token = with_refresh.then(|| {
            let token = self.fresh("rt");
            let entry = RefreshEntry { family, generation, rotated_out: false, scope: scope.to_owned() };
            self.refresh.insert(token.clone(), entry);
            token
        });
        Issued { access_token, refresh_token, scope: scope.to_owned(), family }
    }

    fn family_revoked(&self, family: u64) -> bool {
        self.families.get(&family).is_none_or(|f| f.revoked)
    }

    /// A refresh-token grant, with rotation and reuse detection.
    pub(crate) fn refresh(&mut self, token: &str, rotate: bool, strict_reuse: bool) -> Result<Issued, GrantError> {
        let Some(entry) = self.refresh.get(token) else { return Err("invalid_grant") };
        let (family, scope) = (entry.family, entry.scope.clone());
        if entry.rotated_out {
            self.reuse_attempts += 1;
            if strict_reuse {
                if let Some(f) = self.families.get_mut(&family) {
                    f.revoked = true;
                }
            }
            return Err("invalid_grant");
        }
        if self.family_revoked(family) {
            return Err("invalid_grant");
        }
        self.refreshes += 1;
        if rotate {
            if let Some(entry) = self.refresh.get_mut(token) {
                entry.rotated_out = true;
            }
            Ok(self.issue(family, &scope, true))
        } else {
            let mut issued = self.issue(family, &scope, false);
            issued.refresh_token = None;
            Ok(issued)
        }
    }

    pub(crate) fn is_active(&self, token: &str) -> bool {
        if let Some(entry) = self.refresh.get(token) {
            return !entry.rotated_out && !self.family_revoked(entry.family);
        }
        self.access.get(token).is_some_and(|(family, _)| !self.family_revoked(*family))
    }

    /// `(grant, generation)` of a refresh or access token: which login it
    /// belongs to and which token response (1 = the login) issued it.
    pub(crate) fn lineage(&self, token: &str) -> Option<(u64, u64)> {
        if let Some(entry) = self.refresh.get(token) {
            return Some((entry.family, entry.generation));
        }
        self.access.get(token).copied()
    }

    /// The latest generation issued for a grant.
    pub(crate) fn latest_generation(&self, family: u64) -> Option<u64> {
        self.families.get(&family).map(|f| f.generation)
    }

    /// Revokes the grant a refresh or access token belongs to. RFC 7009 says
    /// an unknown token is not an error, so this answers nothing.
    pub(crate) fn revoke(&mut self, token: &str) {
        let family = self.refresh.get(token).map(|e| e.family).or_else(|| self.access.get(token).map(|(f, _)| *f));
        if let Some(family) = family.and_then(|f| self.families.get_mut(&f)) {
            family.revoked = true;
        }
    }

    pub(crate) fn new_device(&mut self, scope: &str) -> (String, String) {
        let device_code = self.fresh("dc");
        self.next += 1;
        let n = self.next;
        let user_code = format!("{:04}-{:04}", n % 10_000, (n * 7919) % 10_000);
        self.devices.insert(
            device_code.clone(),
            Device { user_code: user_code.clone(), approved: false, used: false, scope: scope.to_owned() },
        );
        (device_code, user_code)
    }

    pub(crate) fn approve_device(&mut self, user_code: &str) -> bool {
        match self.devices.values_mut().find(|d| d.user_code == user_code) {
            Some(device) => {
                device.approved = true;
                true
            }
            None => false,
        }
    }

    pub(crate) fn device_token(&mut self, device_code: &str, with_refresh: bool) -> Result<Issued, GrantError> {
        let Some(device) = self.devices.get_mut(device_code) else { return Err("invalid_grant") };
        if device.used {
            return Err("invalid_grant");
        }
        if !device.approved {
            return Err("authorization_pending");
        }
        device.used = true;
        let scope = device.scope.clone();
        Ok(self.issue_new(&scope, with_refresh))
    }
}
