//! How the store's connections are secured, chosen from the URL's `sslmode`.
//!
//! | `sslmode` | built with `tls` | built without |
//! |---|---|---|
//! | `disable` | plain | plain |
//! | `prefer` (the default), every host on loopback or a Unix socket, no `ca_file` | plain | plain |
//! | `prefer`, some other host, or a `ca_file` given | TLS if the server offers it, verified | plain; with a `ca_file`: refused |
//! | `require` | TLS, verified | refused at start |
//!
//! "Verified" means the server's certificate must chain to Mozilla's roots
//! or to a certificate in `ca_file`, and name the host connected to: this
//! broker never talks TLS to a server it has not authenticated, since an
//! unverified channel would only hide the credentials it carries from
//! nobody. (tokio-postgres knows no `verify-full`; `require` here means it.)
//! Loopback stays plain by default because a database on the same machine
//! gains nothing from TLS, and Debian's packaged server offers TLS with a
//! self-signed certificate no client can verify.

use std::net::IpAddr;
use std::path::PathBuf;

use tokio_postgres::config::{Host, SslMode};

use crate::SetupError;

/// What the operator configures besides the URL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// A PEM file of CA certificates to trust besides Mozilla's roots (a
    /// private CA, or the server's own self-signed certificate).
    pub ca_file: Option<PathBuf>,
}

/// What [`plan`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// No TLS.
    Plain,
    /// TLS with a verified certificate, as far as `sslmode` asks for it.
    Verified,
}

/// Decides, without I/O, how to connect.
pub(crate) fn plan(
    config: &tokio_postgres::Config,
    options: &TlsOptions,
    built_with_tls: bool,
) -> Result<Plan, SetupError> {
    let wants_tls = match config.get_ssl_mode() {
        SslMode::Disable => return Ok(Plan::Plain),
        SslMode::Prefer if options.ca_file.is_none() && all_local(config.get_hosts()) => return Ok(Plan::Plain),
        SslMode::Prefer => options.ca_file.is_some(),
        // `require`, and any stricter mode a later tokio-postgres adds.
        _ => true,
    };
    match (built_with_tls, wants_tls) {
        (true, _) => Ok(Plan::Verified),
        (false, true) => Err(SetupError::TlsNotBuilt),
        (false, false) => Ok(Plan::Plain),
    }
}

/// Whether every host is a Unix socket, `localhost` or a loopback address.
fn all_local(hosts: &[Host]) -> bool {
    hosts.iter().all(|host| match host {
        Host::Tcp(name) => {
            name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        _ => true,
    })
}

/// A connector as [`plan`] decided: plain, or rustls.
#[derive(Clone)]
pub(crate) enum Transport {
    Plain,
    #[cfg(feature = "tls")]
    Tls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Transport {
    pub(crate) fn new(config: &tokio_postgres::Config, options: &TlsOptions) -> Result<Self, SetupError> {
        match plan(config, options, cfg!(feature = "tls"))? {
            Plan::Plain => Ok(Transport::Plain),
            #[cfg(feature = "tls")]
            Plan::Verified => Ok(Transport::Tls(connector(options)?)),
            #[cfg(not(feature = "tls"))]
            Plan::Verified => Err(SetupError::TlsNotBuilt),
        }
    }

    /// The pool's connection manager.
    pub(crate) fn manager(&self, config: tokio_postgres::Config) -> deadpool_postgres::Manager {
        use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod};
        // `Fast` recycling drops connections the server closed (as on a
        // restart); a connection that fails mid-query is closed by then.
        let manager = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        match self {
            Transport::Plain => Manager::from_config(config, tokio_postgres::NoTls, manager),
            #[cfg(feature = "tls")]
            Transport::Tls(tls) => Manager::from_config(config, tls.clone(), manager),
        }
    }

    /// Whether connections use TLS (when the server offers it, under `prefer`).
    pub(crate) fn is_tls(&self) -> bool {
        !matches!(self, Transport::Plain)
    }
}

/// The roots a verified connection trusts: Mozilla's, and those in `ca_file`.
#[cfg(feature = "tls")]
pub(crate) fn connector(options: &TlsOptions) -> Result<tokio_postgres_rustls::MakeRustlsConnect, SetupError> {
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = &options.ca_file {
        for cert in read_certificates(path)? {
            roots.add(cert).map_err(|e| ca_file_error(path, e))?;
        }
    }
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| SetupError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

#[cfg(feature = "tls")]
fn read_certificates(path: &std::path::Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, SetupError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| ca_file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ca_file_error(path, e))?;
    if certs.is_empty() {
        return Err(ca_file_error(path, "it holds no PEM certificate"));
    }
    Ok(certs)
}

#[cfg(feature = "tls")]
fn ca_file_error(path: &std::path::Path, e: impl std::fmt::Display) -> SetupError {
    SetupError::CaFile { path: path.to_owned(), reason: e.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_for(url: &str, ca_file: bool, built: bool) -> Result<Plan, SetupError> {
        let options = TlsOptions { ca_file: ca_file.then(|| PathBuf::from("/etc/ca.pem")) };
        plan(&url.parse().unwrap(), &options, built)
    }

    #[test]
    fn disable_is_plain_whatever_else_is_asked() {
        for (ca, built) in [(false, false), (true, false), (false, true), (true, true)] {
            assert_eq!(plan_for("postgres://db.example/x?sslmode=disable", ca, built), Ok(Plan::Plain));
        }
    }

    #[test]
    fn loopback_and_sockets_stay_plain_by_default() {
        for url in [
            "postgres://postgres@127.0.0.1:5432/test",
            "postgres://localhost/test",
            "postgres://[::1]/test",
            "host=/var/run/postgresql user=postgres",
            "host=127.0.0.1,localhost user=postgres sslmode=prefer",
        ] {
            assert_eq!(plan_for(url, false, true), Ok(Plan::Plain), "{url}");
            assert_eq!(plan_for(url, false, false), Ok(Plan::Plain), "{url}");
        }
    }

    #[test]
    fn other_hosts_are_verified_when_built_with_tls() {
        for url in ["postgres://db.example/x", "host=127.0.0.1,db.example user=u", "postgres://10.0.0.5/x"] {
            assert_eq!(plan_for(url, false, true), Ok(Plan::Verified), "{url}");
            assert_eq!(plan_for(url, false, false), Ok(Plan::Plain), "{url}: prefer without TLS built");
        }
    }

    #[test]
    fn require_or_a_ca_file_needs_tls_built() {
        assert_eq!(plan_for("postgres://127.0.0.1/x?sslmode=require", false, true), Ok(Plan::Verified));
        assert_eq!(plan_for("postgres://127.0.0.1/x", true, true), Ok(Plan::Verified), "a ca_file asks for TLS");
        assert_eq!(plan_for("postgres://127.0.0.1/x?sslmode=require", false, false), Err(SetupError::TlsNotBuilt));
        assert_eq!(plan_for("postgres://db.example/x", true, false), Err(SetupError::TlsNotBuilt));
        let message = SetupError::TlsNotBuilt.to_string();
        assert!(message.contains("postgres-tls"), "{message}");
    }
}
