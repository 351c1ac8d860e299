//! Connections to Redis with a timeout on everything: the connect, every read and every write.
//! An unreachable or stalled Redis makes a call fail after the timeout with an error naming the
//! address, never hang the thread that made it (and no shard ever makes one).

use std::time::Duration;

/// Where Redis is and how long any call may take.
#[derive(Clone)]
pub struct RedisTarget {
    client: redis::Client,
    /// The URL as the operator gave it, for messages.
    pub url: String,
    pub timeout: Duration,
}

impl RedisTarget {
    /// Checks `url` (`redis://HOST:PORT[/DB]`) without connecting.
    pub fn new(url: &str, timeout: Duration) -> Result<RedisTarget, String> {
        if !url.starts_with("redis://") {
            return Err(format!(
                "cluster {url:?}: expected redis://HOST:PORT (plain TCP; no TLS or Unix socket)"
            ));
        }
        let client = redis::Client::open(url).map_err(|e| format!("cluster {url:?}: {e}"))?;
        Ok(RedisTarget {
            client,
            url: url.to_string(),
            timeout,
        })
    }

    /// A new connection whose reads and writes time out after `timeout`.
    pub fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let connection = self.client.get_connection_with_timeout(self.timeout)?;
        connection.set_read_timeout(Some(self.timeout))?;
        connection.set_write_timeout(Some(self.timeout))?;
        Ok(connection)
    }
}

/// Runs a Lua script with its keys and arguments (EVAL: the text travels with every call, so a
/// restarted Redis that forgot its script cache needs nothing special).
pub fn eval<T: redis::FromRedisValue>(
    connection: &mut redis::Connection,
    script: &str,
    keys: &[&str],
    args: &[&str],
) -> redis::RedisResult<T> {
    eval_cmd(script, keys, args).query(connection)
}

/// The EVAL command of [`eval`], to put in a pipeline.
pub fn eval_cmd(script: &str, keys: &[&str], args: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len()).arg(keys).arg(args);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_redis_urls_are_taken() {
        let t = Duration::from_millis(100);
        assert!(RedisTarget::new("redis://127.0.0.1:6379", t).is_ok());
        let e = RedisTarget::new("127.0.0.1:6379", t).err().unwrap();
        assert!(e.contains("expected redis://HOST:PORT"), "{e}");
        assert!(RedisTarget::new("rediss://127.0.0.1:6379", t).is_err());
    }

    #[test]
    fn an_unreachable_redis_fails_fast_with_an_error() {
        // A port nothing listens on (bound, then released).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let target =
            RedisTarget::new(&format!("redis://127.0.0.1:{port}"), Duration::from_secs(1)).unwrap();
        assert!(target.connect().is_err());
    }
}
