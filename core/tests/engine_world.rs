// Shared set-up for the engine tests: a manual clock, a fault-injecting
// MemoryStore, a scripted provider, and brokers built on them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use latchkey_core::catalogue::{Catalogue, ProviderSpec, ServiceSpec};
use latchkey_core::engine::{Callback, LoginComplete};
use latchkey_core::testing::{EventLog, FaultStore, ManualClock, ManualRuntime, ScriptedProvider};
use latchkey_core::{
    AuthId, Broker, BrokerParts, EngineConfig, Grant, GrantId, GrantPayload, Handle, MasterKey, MasterKeyId,
    MasterKeyring, MemoryStore, OsRandom, StoreExt,
};
use secrecy::ExposeSecret;

pub(crate) const SERVICE: &str = "svc";
pub(crate) const OTHER_SERVICE: &str = "other";
pub(crate) const ISSUER: &str = "https://provider.test";
pub(crate) const IDLE: Duration = Duration::from_secs(90 * 86_400);

/// A login begun in a browser: its `state` and the browser's proof cookie.
pub(crate) struct Begun {
    pub(crate) state: String,
    pub(crate) proof: String,
}

impl Begun {
    /// The provider's redirect back to this browser, with `iss`.
    pub(crate) fn callback<'a>(&'a self, code: Option<&'a str>) -> Callback<'a> {
        Callback { state: &self.state, code, iss: Some(ISSUER), browser: Some(&self.proof), ..Callback::default() }
    }
}

/// Begins a login as the broker's page does: a fresh browser proof, then the click.
pub(crate) async fn begin(broker: &Broker, service: &str, handoff: Option<&str>) -> Begun {
    let proof = broker.new_browser_proof().expose_secret().to_owned();
    let start = broker.begin_login(service, handoff, &proof).await.unwrap();
    Begun { state: start.state.expose_secret().to_owned(), proof }
}

pub(crate) struct World {
    pub(crate) clock: ManualClock,
    pub(crate) memory: Arc<MemoryStore>,
    pub(crate) store: Arc<FaultStore>,
    pub(crate) provider: Arc<ScriptedProvider>,
    pub(crate) ring: MasterKeyring,
    pub(crate) log: EventLog,
    /// What the catalogue says about the provider rotating refresh tokens.
    pub(crate) rotation_claim: Option<bool>,
}

pub(crate) fn runtime(clock: &ManualClock) -> Arc<ManualRuntime> {
    Arc::new(ManualRuntime::new(
        clock.clone(),
        Arc::new(|task| {
            tokio::spawn(task);
        }),
    ))
}

impl World {
    pub(crate) fn new(provider: ScriptedProvider) -> Self {
        let log: EventLog = Arc::new(Mutex::new(Vec::new()));
        let memory = Arc::new(MemoryStore::new());
        let store = Arc::new(FaultStore::new(memory.clone()).with_log(log.clone()));
        let ring = MasterKeyring::single(MasterKey::generate(MasterKeyId::new("k1").unwrap(), &OsRandom));
        World {
            clock: ManualClock::default(),
            memory,
            store,
            provider: Arc::new(provider.with_log(log.clone())),
            ring,
            log,
            rotation_claim: None,
        }
    }

    pub(crate) fn catalogue(&self) -> Catalogue {
        let mut catalogue = Catalogue::new();
        let mut spec = ProviderSpec::new("scripted");
        spec.issuer = Some(ISSUER.into());
        spec.refresh_idle_lifetime = Some(IDLE);
        spec.rotates_refresh_tokens = self.rotation_claim;
        catalogue.add_provider(spec, self.provider.clone()).unwrap();
        let mut svc = ServiceSpec::new(SERVICE, "scripted");
        svc.scopes = vec!["files".into(), "offline_access".into()];
        catalogue.add_service(svc).unwrap();
        catalogue.add_service(ServiceSpec::new(OTHER_SERVICE, "scripted")).unwrap();
        catalogue
    }

    /// A broker with test-friendly settings: no provider retries (each would
    /// wait on the manual clock) unless a test asks for them.
    pub(crate) async fn broker(&self, name: &str, tweak: impl FnOnce(&mut EngineConfig)) -> Broker {
        self.broker_with_ring(name, self.ring.clone(), tweak).await
    }

    pub(crate) async fn broker_with_ring(
        &self,
        name: &str,
        ring: MasterKeyring,
        tweak: impl FnOnce(&mut EngineConfig),
    ) -> Broker {
        let mut config = EngineConfig { instance_id: name.into(), provider_retries: 0, ..EngineConfig::default() };
        tweak(&mut config);
        let broker = Broker::new(BrokerParts {
            store: self.store.clone(),
            catalogue: self.catalogue(),
            keyring: ring,
            runtime: runtime(&self.clock),
            rng: Arc::new(OsRandom),
            config,
        });
        broker.start().await.unwrap();
        broker
    }

    /// A whole browser login: begin, the user approves at the provider, callback.
    pub(crate) async fn login(&self, broker: &Broker) -> LoginComplete {
        let begun = begin(broker, SERVICE, None).await;
        let code = self.provider.approve(&begun.state).expect("the provider saw the state");
        broker.complete_login(&begun.callback(Some(&code))).await.unwrap()
    }

    pub(crate) async fn grant(&self, id: &GrantId) -> Grant {
        self.memory.load::<Grant>(id.as_bytes()).await.unwrap().expect("grant stored")
    }

    /// The grant's payload as stored, opened with the AuthID (as a test may).
    pub(crate) async fn payload(&self, authid: &AuthId) -> GrantPayload {
        let handle: Handle = self.memory.load(authid.keyid().as_bytes()).await.unwrap().unwrap();
        let key = handle.unwrap_data_key(authid.secret(), &self.ring).unwrap();
        self.grant(&handle.grant_id).await.open_payload(&key).unwrap()
    }

    pub(crate) async fn stored_refresh_token(&self, authid: &AuthId) -> String {
        self.payload(authid).await.refresh_token.unwrap().expose_secret().to_owned()
    }

    pub(crate) fn events(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub(crate) fn expire_tokens(&self) {
        self.clock.advance(Duration::from_secs(3601));
    }
}

/// Yields to other tasks until `done` holds. Drives progress; the wall-clock
/// bound only turns a hang into a failure.
/// A token request on its own task, as a client's would be.
pub(crate) fn spawn_token(
    broker: &Broker,
    authid: &AuthId,
) -> tokio::task::JoinHandle<Result<latchkey_core::TokenGrant, latchkey_core::EngineError>> {
    let (broker, authid) = (broker.clone(), authid.clone());
    tokio::spawn(async move { broker.token(&authid, None).await })
}

pub(crate) async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let give_up = std::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(std::time::Instant::now() < give_up, "never happened: {what}");
        tokio::task::yield_now().await;
    }
}
