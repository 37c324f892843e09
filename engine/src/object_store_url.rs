//! The object store a process runs on, from its URL: `file:///path` (the
//! embedded default, fsynced: `crate::local_store`), `s3://bucket[/prefix]`,
//! `gs://bucket[/prefix]` or `az://container[/prefix]`, configured as the
//! `object_store` crate's users expect: its environment variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_REGION`, `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`,
//! `GOOGLE_*`, `AZURE_*`) and then explicit `key=value` options for the
//! same keys. Requests are retried with backoff and each is bounded in
//! time (the crate's defaults: 10 retries within 3 minutes, 30 s a
//! request), unless the options say otherwise.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use object_store::prefix::PrefixStore;
use object_store::ObjectStore;
use thiserror::Error;
use url::Url;

use crate::local_store::SyncedLocalStore;

#[derive(Debug, Error)]
pub enum StoreUrlError {
    #[error("object store URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error(
        "an --object-store-option is not key=value (its text is not shown: it may be a secret)"
    )]
    Option,
    #[error("local object store {path}: {source}")]
    Local {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("object store {url}: {source}")]
    Store {
        url: String,
        source: object_store::Error,
    },
}

/// Environment variables the cloud stores read, as the crate names them.
const ENV_PREFIXES: [&str; 3] = ["AWS_", "GOOGLE_", "AZURE_"];

/// The store `url` names (`None`: the local directory `default_dir`),
/// configured from the environment and then `options` (`key=value`).
pub fn open_object_store(
    url: Option<&str>,
    default_dir: &FsPath,
    options: &[String],
) -> Result<Arc<dyn ObjectStore>, StoreUrlError> {
    let Some(text) = url else {
        return local(default_dir);
    };
    let bad = |reason: String| StoreUrlError::Url {
        url: redacted(text),
        reason,
    };
    let url = Url::parse(text).map_err(|e| bad(e.to_string()))?;
    if !url.username().is_empty()
        || url.password().is_some()
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return Err(bad(
            "credentials and other settings go in the environment or --object-store-option, \
             not the URL"
                .into(),
        ));
    }
    match url.scheme() {
        "file" => {
            let path = url
                .to_file_path()
                .map_err(|()| bad("not an absolute local path".into()))?;
            local(&path)
        }
        "s3" | "s3a" | "gs" | "az" | "azure" | "abfs" | "abfss" => {
            cloud(&url, options).map_err(|e| match e {
                StoreUrlError::Store { source, .. } => bad(source.to_string()),
                other => other,
            })
        }
        other => Err(bad(format!(
            "scheme {other:?}: use file://, s3://, gs:// or az://"
        ))),
    }
}

fn local(dir: &FsPath) -> Result<Arc<dyn ObjectStore>, StoreUrlError> {
    let error = |source| StoreUrlError::Local {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(error)?;
    let dir = dir.canonicalize().map_err(error)?;
    Ok(Arc::new(SyncedLocalStore::new(dir.clone()).map_err(
        |e| StoreUrlError::Local {
            path: dir,
            source: std::io::Error::other(e.to_string()),
        },
    )?))
}

fn cloud(url: &Url, options: &[String]) -> Result<Arc<dyn ObjectStore>, StoreUrlError> {
    // Variables that are not UTF-8 cannot be configuration: skipped, not
    // a panic.
    let mut config: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| ENV_PREFIXES.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    for option in options {
        let (k, v) = option.split_once('=').ok_or(StoreUrlError::Option)?;
        config.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let (store, prefix) =
        object_store::parse_url_opts(url, config).map_err(|source| StoreUrlError::Store {
            url: redacted(url.as_str()),
            source,
        })?;
    let store: Arc<dyn ObjectStore> = Arc::from(store);
    if prefix.as_ref().is_empty() {
        Ok(store)
    } else {
        Ok(Arc::new(PrefixStore::new(store, prefix)))
    }
}

/// The URL without credentials or a query string (which can carry SAS
/// tokens): what logs and errors may show.
pub fn redacted(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) if url.contains('@') => "(a URL with credentials, not shown)".into(),
        Err(_) => url.split(['?', '#']).next().unwrap_or_default().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::path::Path;
    use object_store::{ObjectStoreExt, PutPayload};

    #[tokio::test]
    async fn file_urls_and_the_default_are_the_synced_local_store() {
        let dir = tempfile::tempdir().unwrap();
        let default = open_object_store(None, &dir.path().join("objects"), &[]).unwrap();
        default
            .put(&Path::from("a/b"), PutPayload::from("x"))
            .await
            .unwrap();
        assert!(dir.path().join("objects/a/b").exists());
        let url = format!("file://{}", dir.path().join("other").display());
        let other = open_object_store(Some(&url), dir.path(), &[]).unwrap();
        other
            .put(&Path::from("c"), PutPayload::from("y"))
            .await
            .unwrap();
        assert!(dir.path().join("other/c").exists());
    }

    #[test]
    fn bad_urls_and_options_say_why_without_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let err = |url: &str, options: &[&str]| {
            let options: Vec<String> = options.iter().map(|s| s.to_string()).collect();
            match open_object_store(Some(url), dir.path(), &options) {
                Ok(_) => panic!("{url} opened"),
                Err(e) => e.to_string(),
            }
        };
        let e = err("ftp://host/x", &[]);
        assert!(e.contains("scheme \"ftp\""), "{e}");
        let e = err("s3://key:hunter2@bucket/x", &[]);
        assert!(e.contains("credentials") && !e.contains("hunter2"), "{e}");
        let e = err("s3://bucket/x", &["aws_secret_access_key"]);
        assert!(e.contains("key=value"), "{e}");
        let e = err(
            "az://container?sig=hunter2",
            &["azure_storage_account_name"],
        );
        assert!(!e.contains("hunter2"), "{e}");
        let e = err("not a url", &[]);
        assert!(e.contains("not a url"), "{e}");
        let e = err("s3//key:hunter2@bucket", &[]);
        assert!(!e.contains("hunter2"), "{e}");
    }
}
