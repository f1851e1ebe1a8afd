//! A fresh PostgreSQL database per test,
//! copied from a migrated template, and a random Redis key prefix and
//! channel per test, so tests never share data and run in any order, in
//! parallel.
//!
//! `TEST_DATABASE_URL` (a server where databases may be created) and
//! `TEST_REDIS_URL` default to the local services; `scripts/test.sh` sets
//! them. A missing service fails the test loudly: nothing is skipped.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use secrecy::SecretString;

use chat_shared::Config;
use chat_shared::auth::{DevClaims, mint_hs256};

pub const SECRET: &str = "test-secret-for-the-suite";

pub fn admin_db_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `TEST_REDIS_URL`: one URL, or a Redis Cluster's seed URLs separated by
/// commas.
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Whether the suites run against a Redis Cluster: `TEST_REDIS_CLUSTER=true`
/// (or a `TEST_REDIS_URL` listing several nodes). `scripts/test.sh` runs
/// the end-to-end suites a second time so.
pub fn redis_cluster() -> bool {
    std::env::var("TEST_REDIS_CLUSTER").is_ok_and(|v| v == "true" || v == "1")
        || redis_url().contains(',')
}

/// The test Redis, single or cluster, as the service connects to it.
pub async fn redis_conn() -> chat_shared::redis_conn::RedisConn {
    redis_conn_at(&redis_url()).await
}

/// The Redis at `url` (a cluster when it lists several nodes, or when the
/// suites run on one and it is theirs), as the service connects to it.
pub async fn redis_conn_at(url: &str) -> chat_shared::redis_conn::RedisConn {
    chat_shared::redis_conn::RedisConn::connect(&chat_shared::redis_conn::RedisTarget {
        url: url.to_owned().into(),
        cluster: url.contains(',') || (redis_cluster() && url == redis_url()),
    })
    .await
    .expect("the test Redis answers")
}

/// How many clients are subscribed to the bus channels of `base` at the
/// Redis `url` (those of the last partition: a relay subscribes to it
/// last). On a cluster (`url` lists its nodes), the sharded subscriptions
/// of every node, summed.
pub async fn bus_subscribers(url: &str, base: &str) -> redis::RedisResult<i64> {
    let channel =
        chat_shared::presence::Keys::bus_channel(base, chat_shared::presence::keys::PARTITIONS - 1);
    let urls: Vec<String> = url.split(',').map(|u| u.trim().to_owned()).collect();
    let command = if urls.len() > 1 {
        "SHARDNUMSUB"
    } else {
        "NUMSUB"
    };
    let mut total = 0;
    for url in urls {
        let mut conn = redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await?;
        let (_, count): (String, i64) = redis::cmd("PUBSUB")
            .arg(command)
            .arg(&channel)
            .query_async(&mut conn)
            .await?;
        total += count;
    }
    Ok(total)
}

/// A random lowercase suffix for database names and key prefixes.
pub fn random_suffix() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..12)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect()
}

/// `url` with its database replaced by `db`. A URL keeps everything else,
/// its query (`sslmode`, `sslrootcert`) included.
fn with_database(url: &str, db: &str) -> String {
    if let Some(rest) = ["postgres://", "postgresql://"]
        .iter()
        .find_map(|scheme| url.strip_prefix(scheme))
    {
        let authority_start = url.len() - rest.len() + rest.find('@').map_or(0, |at| at + 1);
        let after = &url[authority_start..];
        let path_start = authority_start + after.find(['/', '?']).unwrap_or(after.len());
        let query = url[path_start..]
            .find('?')
            .map_or("", |q| &url[path_start + q..]);
        return format!("{}/{db}{query}", &url[..path_start]);
    }
    let mut config: tokio_postgres::Config = url.parse().expect("TEST_DATABASE_URL parses");
    config.dbname(db);
    // Rebuild a URL from the parts we use.
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres");
    match config.get_password() {
        Some(pw) => format!(
            "postgres://{user}:{}@{host}:{port}/{db}",
            String::from_utf8_lossy(pw)
        ),
        None => format!("postgres://{user}@{host}:{port}/{db}"),
    }
}

/// Creates a fresh database from the migrated template and returns its URL.
pub async fn fresh_database() -> String {
    let admin = admin_db_url();
    let (client, _conn) = chat_shared::pg_tls::connect(&SecretString::from(admin.clone()))
        .await
        .unwrap_or_else(|e| {
            panic!("cannot reach PostgreSQL at TEST_DATABASE_URL={admin}: {e:#}. Run scripts/test.sh, which starts it.")
        });
    // The template's name carries a hash of the migrations, so a changed
    // migration gets a new template.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("migrations dir")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    for f in &files {
        std::fs::read_to_string(f)
            .expect("migration")
            .hash(&mut hasher);
    }
    let template = format!("chat_template_{:x}", hasher.finish());
    client
        .execute("SELECT pg_advisory_lock(727274)", &[])
        .await
        .expect("lock");
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&template])
        .await
        .expect("query")
        .is_some();
    if !exists {
        let building = format!("{template}_building");
        client
            .execute(&format!("DROP DATABASE IF EXISTS {building}"), &[])
            .await
            .expect("drop");
        client
            .execute(&format!("CREATE DATABASE {building}"), &[])
            .await
            .expect("create template");
        chat_shared::store::migrate(&SecretString::from(with_database(&admin, &building)))
            .await
            .expect("migrations apply");
        client
            .execute(
                &format!("ALTER DATABASE {building} RENAME TO {template}"),
                &[],
            )
            .await
            .expect("rename template");
    }
    let db = format!("chat_test_{}", random_suffix());
    let created = client
        .execute(&format!("CREATE DATABASE {db} TEMPLATE {template}"), &[])
        .await;
    client
        .execute("SELECT pg_advisory_unlock(727274)", &[])
        .await
        .expect("unlock");
    created.expect("create test database");
    with_database(&admin, &db)
}

/// A test's own configuration: its database, Redis prefix and channel.
pub struct TestEnv {
    pub vars: HashMap<String, String>,
}

impl TestEnv {
    pub async fn new() -> Self {
        let db = fresh_database().await;
        let prefix = format!("test:{}:", random_suffix());
        let vars = HashMap::from([
            ("DATABASE_URL".to_owned(), db),
            ("REDIS_URL".to_owned(), redis_url()),
            ("REDIS_CLUSTER".to_owned(), redis_cluster().to_string()),
            ("REDIS_KEY_PREFIX".to_owned(), prefix.clone()),
            ("BROADCAST_CHANNEL".to_owned(), format!("{prefix}broadcast")),
            ("JWT_SECRET".to_owned(), SECRET.to_owned()),
            ("INSTANCE_ID".to_owned(), "test".to_owned()),
            ("PG_POOL_MAX".to_owned(), "24".to_owned()),
            // Suites send as fast as they can; those about rate limits
            // turn them on with `set`.
            ("RATE_LIMIT_PER_SEC".to_owned(), "0".to_owned()),
            ("REST_RATE_LIMIT_PER_SEC".to_owned(), "0".to_owned()),
        ]);
        Self { vars }
    }

    pub fn set(&mut self, key: &str, value: &str) -> &mut Self {
        self.vars.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Another env over the same database, Redis prefix and channel: a
    /// second instance of the service (e.g. with other settings).
    pub fn sharing(&self) -> Self {
        Self {
            vars: self.vars.clone(),
        }
    }

    pub fn config(&self) -> Config {
        Config::from_lookup(|k| self.vars.get(k).cloned()).expect("test config is valid")
    }
}

pub fn token_with(user: &str, edit: impl FnOnce(&mut DevClaims)) -> String {
    let mut claims = DevClaims::new(user, 3600);
    edit(&mut claims);
    mint_hs256(&SecretString::from(SECRET), &claims).expect("mint")
}

/// base64url without padding, as JWTs use it.
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let sextets = [(n >> 18) & 63, (n >> 12) & 63, (n >> 6) & 63, n & 63];
        for s in sextets.iter().take(chunk.len() + 1) {
            out.push(char::from(ALPHABET[*s as usize]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn with_database_keeps_the_rest_of_a_url() {
        for (url, want) in [
            (
                "postgres://postgres@127.0.0.1:5432/postgres",
                "postgres://postgres@127.0.0.1:5432/t",
            ),
            ("postgresql://h", "postgresql://h/t"),
            (
                "postgres://h?sslmode=require",
                "postgres://h/t?sslmode=require",
            ),
            (
                "postgres://u:a/b?c@h:1/postgres?sslmode=verify-full&sslrootcert=/ca.pem",
                "postgres://u:a/b?c@h:1/t?sslmode=verify-full&sslrootcert=/ca.pem",
            ),
        ] {
            assert_eq!(with_database(url, "t"), want, "{url}");
        }
    }
}
