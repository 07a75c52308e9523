//! TLS to PostgreSQL through rustls, with libpq's `sslmode` meanings:
//! `prefer` and `require` encrypt without checking the certificate (unless
//! `require` is given an `sslrootcert`, then the chain is checked, as libpq
//! does), `verify-ca` checks the chain against `sslrootcert`, `verify-full`
//! also checks that the certificate names the host. tokio-postgres itself
//! knows only disable, prefer and require: the checking is done here.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{PostgresUrl, SslMode};

/// The TLS connector for `url`'s `sslmode` and `sslrootcert`.
pub(super) fn connector(url: &PostgresUrl) -> anyhow::Result<MakeRustlsConnect> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match (url.ssl_mode, &url.ssl_root_cert) {
        (SslMode::VerifyFull, Some(file)) => chain_verifier(file, &provider)?,
        (SslMode::VerifyCa | SslMode::Require, Some(file)) => {
            Arc::new(ChainOnly(chain_verifier(file, &provider)?))
        }
        (SslMode::VerifyFull | SslMode::VerifyCa, None) => anyhow::bail!(
            "database.url has sslmode={} but no sslrootcert: add sslrootcert=/path/to/ca.pem",
            url.ssl_mode.as_str()
        ),
        (SslMode::Disable | SslMode::Prefer | SslMode::Require, _) => {
            Arc::new(EncryptOnly(provider.clone()))
        }
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("the TLS library offers no protocol version")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// Checks the chain to the CAs in `file` and the host name (rustls' own check).
fn chain_verifier(
    file: &Path,
    provider: &Arc<CryptoProvider>,
) -> anyhow::Result<Arc<WebPkiServerVerifier>> {
    let mut roots = RootCertStore::empty();
    let certificates = CertificateDer::pem_file_iter(file)
        .with_context(|| format!("cannot read database.url sslrootcert {}", file.display()))?;
    for certificate in certificates {
        let certificate = certificate.with_context(|| {
            format!(
                "database.url sslrootcert {} is not PEM certificates",
                file.display()
            )
        })?;
        roots.add(certificate).with_context(|| {
            format!(
                "database.url sslrootcert {} holds a certificate that is not a CA",
                file.display()
            )
        })?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "database.url sslrootcert {} holds no certificate",
        file.display()
    );
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("cannot build the certificate check")
}

/// `verify-ca`: the chain must lead to a trusted CA; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // rustls checks the chain first and the name last, so a name error
        // means the chain was good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require` without `sslrootcert`: encryption against
/// passive eavesdropping, as libpq gives; the handshake's signatures are
/// still checked, the certificate is not.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
