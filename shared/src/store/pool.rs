//! The pool, migrations, and the connection a request holds.

use std::time::Duration;

use anyhow::Context as _;
use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use secrecy::SecretString;
use tokio_postgres::{Error as PgError, Row, Statement};

use crate::error::Result;
use crate::pg_tls;

use super::messages::Batcher;

mod embedded {
    refinery::embed_migrations!("../migrations");
}

/// Settings of this service's own sessions, run once on each new pooled
/// connection (one round trip per connection, none per request).
///
/// `random_page_cost = 1.1`: PostgreSQL's default (4.0) prices a random
/// page read as a spinning disk would; RDS (gp3, io) and local SSDs read any
/// page at about the cost of the next, and 1.1 is the usual setting for
/// them. With 4.0 the generic plan of the batch insert (`store/messages.rs`)
/// deleted retired messages with a bitmap heap scan per room: EXPLAIN
/// ANALYZE of a 16-message batch gave 0.85-1.25 ms for that step and
/// 1.7-2.2 ms in all; with 1.1 it is an index scan, 0.2-0.4 ms, and
/// 1.1-1.3 ms in all. Every other statement here is a key lookup or a short
/// range of a key, which index scans suit too.
///
/// A `SET`, not the startup packet's `options`: RDS Proxy refuses
/// connections that carry options ("RDS Proxy currently doesn't support
/// command-line options"). A `SET` may pin the session to one database
/// connection behind the proxy, as the named prepared statements already
/// do (docs/DEPLOY.md).
pub const SESSION_SETUP: &str = "SET random_page_cost = 1.1";

/// Builds the connection pool. Connections are opened lazily, so this
/// succeeds while the database is down; requests then get 503.
///
/// TLS as the URL's `sslmode` / `sslrootcert` say ([`pg_tls`]).
///
/// # Errors
/// When the URL does not parse, or its TLS settings are invalid (see
/// [`pg_tls::pg_config`]).
pub fn connect_pool(url: &SecretString, max_size: usize) -> anyhow::Result<Pool> {
    let (pg, tls) = pg_tls::pg_config(url)?;
    let manager = Manager::from_connect(
        pg,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .post_create(Hook::async_fn(|client, _| {
            Box::pin(async move {
                client
                    .batch_execute(SESSION_SETUP)
                    .await
                    .map_err(HookError::Backend)
            })
        }))
        .build()
        .context("building the PostgreSQL pool")
}

/// Applies the migrations in `migrations/` that have not run yet. Instances
/// starting together serialise on an advisory lock.
///
/// # Errors
/// When the database cannot be reached or a migration fails.
pub async fn migrate(url: &SecretString) -> anyhow::Result<usize> {
    let (mut client, conn_task) = pg_tls::connect(url)
        .await
        .context("connecting to PostgreSQL to migrate")?;
    client
        .execute("SELECT pg_advisory_lock(727273)", &[])
        .await
        .context("taking the migration lock")?;
    let report = embedded::migrations::runner()
        .run_async(&mut client)
        .await
        .context("applying migrations");
    // The lock goes with the session either way.
    drop(client);
    let _ = conn_task.await;
    Ok(report?.applied_migrations().len())
}

/// A pooled connection that counts its round trips
/// ([`crate::metrics::record_pg_round_trip`]): one per statement, plus one
/// for a prepare that missed the connection's statement cache. The methods
/// mirror `tokio_postgres::Client`'s, so queries read as usual.
pub(super) struct Client(deadpool_postgres::Object);

type Params<'a> = &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)];

/// Methods that count one round trip, then run the `tokio_postgres` method
/// of the same name with a prepared statement.
macro_rules! counted {
    ($($name:ident -> $out:ty;)*) => {$(
        pub(super) async fn $name(
            &self,
            statement: &Statement,
            params: Params<'_>,
        ) -> std::result::Result<$out, PgError> {
            crate::metrics::record_pg_round_trip();
            self.0.$name(statement, params).await
        }
    )*};
}

impl Client {
    pub(super) async fn prepare_cached(
        &self,
        query: &str,
    ) -> std::result::Result<Statement, PgError> {
        let cached = self.0.statement_cache.size();
        let statement = self.0.prepare_cached(query).await?;
        if self.0.statement_cache.size() != cached {
            crate::metrics::record_pg_round_trip();
        }
        Ok(statement)
    }

    counted! {
        query -> Vec<Row>;
        query_opt -> Option<Row>;
        query_one -> Row;
        execute -> u64;
    }

    pub(super) async fn simple_query(
        &self,
        query: &str,
    ) -> std::result::Result<Vec<tokio_postgres::SimpleQueryMessage>, PgError> {
        crate::metrics::record_pg_round_trip();
        self.0.simple_query(query).await
    }
}

/// The PostgreSQL side of the service.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    pub(super) retention: i64,
    /// Sends waiting to share a statement (group commit).
    pub(super) batcher: Batcher,
}

crate::debug_fields!(Store { retention });

impl Store {
    /// A store over `pool` that keeps the newest `retention` messages per
    /// room (0 keeps all).
    pub fn new(pool: Pool, retention: i64) -> Self {
        Self {
            pool,
            retention,
            batcher: Batcher::default(),
        }
    }

    /// The pool (for health checks and load shedding).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// How many requests are waiting for a connection, or (sends) for a
    /// batch: what load shedding looks at.
    pub fn waiting(&self) -> usize {
        self.pool.status().waiting + self.batcher.queued()
    }

    /// One pooled connection, for the statements of one request.
    ///
    /// This is the only way to a connection, and nothing reached from a
    /// [`Conn`] can take another: a request that needs several statements
    /// runs them all on the one it took (see [`Conn`]).
    ///
    /// # Errors
    /// `UNAVAILABLE` when no connection could be had within the pool's wait
    /// timeout, or PostgreSQL does not answer.
    pub async fn conn(&self) -> Result<Conn> {
        Ok(Conn {
            client: Client(self.pool.get().await?),
            retention: self.retention,
        })
    }

    pub(super) async fn client(&self) -> Result<Client> {
        Ok(Client(self.pool.get().await?))
    }

    /// Answers when PostgreSQL answers.
    ///
    /// # Errors
    /// `UNAVAILABLE` when it does not.
    pub async fn ping(&self) -> Result<()> {
        let client = self.client().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }
}

/// One pooled PostgreSQL connection, and every query of the service but the
/// batched send ([`Store::store_message`]); its queries are in the
/// modules beside this one.
///
/// The rule it enforces: **a request holds at most one connection at a
/// time.** A request that held one connection and then waited for a second
/// could wait forever: with the pool full of requests doing the same, none
/// gets its second and none returns its first (until the pool's wait
/// timeout fails them all). So a `Conn` has no way back to the pool: every
/// method runs on `self`, a method that needs another query runs it on the
/// same connection, and independent queries of one request are pipelined
/// on it (`tokio::try_join!` over `&Conn` methods) instead of taking a
/// connection each. `shared/tests/it/pool_nesting.rs` runs the request types
/// that used to nest with a pool of one connection.
pub struct Conn {
    pub(super) client: Client,
    pub(super) retention: i64,
}

crate::debug_fields!(Conn {});
