//! Building providers from `conversion_providers` rows.
//!
//! The caller loads the rows (this module never touches the database) and asks
//! a [`ProviderRegistry`] to [`build`](ProviderRegistry::build) each one. The
//! registry maps a row's `provider_type` to a constructor, so a new provider is
//! one implementation of [`ConversionProvider`], one
//! [`register`](ProviderRegistry::register) call, and one row.
//!
//! Settings and secrets come from an environment lookup given to the registry
//! (the process environment in production, a map in tests); rows only name
//! environment variables (`credentials_ref`), never hold secrets.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use super::due::{DueConfig, DueProvider};
use super::row::{ProviderRow, optional_env};
use super::sandbox::{SandboxBehaviour, SandboxProvider};
use super::zerohash::{ZeroHashConfig, ZeroHashProvider};
use super::{ConversionProvider, ProviderError};

/// Looks a setting up by name (the process environment, or a map in tests).
pub type EnvLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Builds one provider from its row, reading settings through the lookup.
pub type ProviderFactory = Arc<
    dyn Fn(
            &ProviderRow,
            &dyn Fn(&str) -> Option<String>,
        ) -> Result<Arc<dyn ConversionProvider>, ProviderError>
        + Send
        + Sync,
>;

/// Maps `provider_type` strings to constructors.
#[derive(Clone)]
pub struct ProviderRegistry {
    env: EnvLookup,
    factories: BTreeMap<String, ProviderFactory>,
}

impl fmt::Debug for ProviderRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderRegistry")
            .field("provider_types", &self.provider_types())
            .finish_non_exhaustive()
    }
}

impl ProviderRegistry {
    /// An empty registry reading settings through `env`.
    pub fn new(env: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> Self {
        Self {
            env: Arc::new(env),
            factories: BTreeMap::new(),
        }
    }

    /// The shipped providers: `due`, `zerohash` and `sandbox`.
    ///
    /// `sandbox`: when `sandbox` is given, every `sandbox` row is served by a
    /// clone of it (clones share state, so a test or the demo can inspect what
    /// the provider saw), named after the row. Otherwise each `sandbox` row gets
    /// its own deterministic sandbox, seeded from `SANDBOX_SEED` (default: the
    /// row id) with the row's fee and spread, and kept for the registry's life
    /// so that building the same row twice gives the same conversions.
    pub fn standard(
        env: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
        sandbox: Option<SandboxProvider>,
    ) -> Self {
        let mut registry = Self::new(env);
        registry.register("due", |row, env| {
            let config = DueConfig::from_env(row, env)?;
            Ok(Arc::new(DueProvider::new(row.name.clone(), config)?)
                as Arc<dyn ConversionProvider>)
        });
        registry.register("zerohash", |row, env| {
            let config = ZeroHashConfig::from_env(row, env)?;
            Ok(Arc::new(ZeroHashProvider::new(row.name.clone(), config)?)
                as Arc<dyn ConversionProvider>)
        });
        let built: Arc<Mutex<HashMap<Uuid, SandboxProvider>>> = Arc::default();
        registry.register("sandbox", move |row, env| {
            let provider = match &sandbox {
                Some(shared) => shared.named(row.name.clone()),
                None => {
                    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(existing) = built.get(&row.id) {
                        existing.named(row.name.clone())
                    } else {
                        let seed = match optional_env(env, "SANDBOX_SEED") {
                            Some(text) => text.parse::<u64>().map_err(|_| {
                                ProviderError::Configuration(format!(
                                    "SANDBOX_SEED={text:?} is not an unsigned integer"
                                ))
                            })?,
                            None => row.id.as_u64_pair().0 ^ row.id.as_u64_pair().1,
                        };
                        let provider = SandboxProvider::new(seed, SandboxBehaviour::from_row(row))
                            .named(row.name.clone());
                        built.insert(row.id, provider.clone());
                        provider
                    }
                }
            };
            Ok(Arc::new(provider) as Arc<dyn ConversionProvider>)
        });
        registry
    }

    /// [`ProviderRegistry::standard`] reading the process environment.
    pub fn from_process_env(sandbox: Option<SandboxProvider>) -> Self {
        Self::standard(|var| std::env::var(var).ok(), sandbox)
    }

    /// Registers (or replaces) the constructor for `provider_type`
    /// (matched case-insensitively).
    pub fn register(
        &mut self,
        provider_type: &str,
        factory: impl Fn(
            &ProviderRow,
            &dyn Fn(&str) -> Option<String>,
        ) -> Result<Arc<dyn ConversionProvider>, ProviderError>
        + Send
        + Sync
        + 'static,
    ) -> &mut Self {
        self.factories
            .insert(normalise(provider_type), Arc::new(factory));
        self
    }

    /// The registered provider types, sorted.
    pub fn provider_types(&self) -> Vec<&str> {
        self.factories.keys().map(String::as_str).collect()
    }

    /// Builds the provider a row describes, its calls counted in
    /// `treasury_provider_requests_total`. An unregistered `provider_type`,
    /// or a setting or credential its constructor needs, is a
    /// [`ProviderError::Configuration`] error naming the type or variable.
    pub fn build(&self, row: &ProviderRow) -> Result<Arc<dyn ConversionProvider>, ProviderError> {
        let key = normalise(&row.provider_type);
        let factory = self.factories.get(&key).ok_or_else(|| {
            ProviderError::Configuration(format!(
                "provider {:?} has unknown provider_type {:?} (registered: {})",
                row.name,
                row.provider_type,
                self.provider_types().join(", ")
            ))
        })?;
        let env = &*self.env;
        factory(row, env)
            .map(|p| Arc::new(super::metered::Metered::new(p)) as Arc<dyn ConversionProvider>)
            .map_err(|e| match e {
                ProviderError::Configuration(msg) => {
                    ProviderError::Configuration(format!("provider {:?}: {msg}", row.name))
                }
                other => other,
            })
    }
}

fn normalise(provider_type: &str) -> String {
    provider_type.trim().to_ascii_lowercase()
}
