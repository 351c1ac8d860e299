//! The `[wechat]` configuration section: the official accounts the node serves and the sender's
//! limits, deserialised by serde and checked into an [`Account`] per official account.
//!
//! ```toml
//! [wechat.sender]                 # optional: the sender's limits (see `SenderLimits`)
//! send_attempts_max = 5
//!
//! [[wechat.account]]
//! app_id = "wx5823bf96d3bd56c7"
//! app_secret = "..."
//! token = "QDG6eK"                # the Token set on the account's server configuration page
//! encoding_aes_key = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
//! mode = "safe"                   # plain | compatible | safe
//! shop = 42                       # the shop whose agents answer this account's customers
//! # api_base = "https://api.weixin.qq.com"   (the default; a stand-in's URL in tests)
//! # kf_account = "kf2001@gh_xxx"            (optional: replies sent as this agent account)
//! ```

use serde::Deserialize;

use super::cipher::{AesKey, KeyError};
use super::sender::SenderLimits;

/// WeChat's API, where replies and access tokens go unless an account says otherwise.
pub const API_BASE_DEFAULT: &str = "https://api.weixin.qq.com";

/// The `[wechat]` section as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WechatSection {
    #[serde(default, rename = "account")]
    pub accounts: Vec<AccountSettings>,
    #[serde(default)]
    pub sender: SenderLimits,
}

/// One `[[wechat.account]]` table as written.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountSettings {
    pub app_id: String,
    pub app_secret: String,
    pub token: String,
    #[serde(default)]
    pub encoding_aes_key: Option<String>,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default = "api_base_default")]
    pub api_base: String,
    pub shop: u64,
    #[serde(default)]
    pub kf_account: Option<String>,
}

impl std::fmt::Debug for AccountSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets (app secret, token, AES key) never reach a log.
        f.debug_struct("AccountSettings")
            .field("app_id", &self.app_id)
            .field("mode", &self.mode)
            .field("api_base", &self.api_base)
            .field("shop", &self.shop)
            .finish_non_exhaustive()
    }
}

fn api_base_default() -> String {
    API_BASE_DEFAULT.to_string()
}

/// The account's message encryption mode (消息加解密方式), as set on its configuration page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// 明文模式: bodies in clear, signed by `signature` only.
    #[default]
    Plain,
    /// 兼容模式: WeChat sends both; the encrypted part is used when present.
    Compatible,
    /// 安全模式: bodies encrypted; `msg_signature` required.
    Safe,
}

/// An official account, checked.
#[derive(Clone)]
pub struct Account {
    pub app_id: String,
    pub app_secret: String,
    pub token: String,
    /// Present unless the mode is plain.
    pub aes_key: Option<AesKey>,
    pub mode: Mode,
    /// Without a trailing `/`.
    pub api_base: String,
    pub shop: u64,
    pub kf_account: Option<String>,
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("app_id", &self.app_id)
            .field("mode", &self.mode)
            .field("api_base", &self.api_base)
            .field("shop", &self.shop)
            .finish_non_exhaustive()
    }
}

/// Why a `[wechat]` section was refused (the node does not start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountError {
    AppId(String),
    Secret(String),
    Token(String),
    AesKey(String, KeyError),
    AesKeyMissing(String),
    ApiBase(String),
    Duplicate(String),
}

impl std::fmt::Display for AccountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccountError::AppId(id) => write!(
                f,
                "wechat account {id:?}: app_id must be 1..=64 ASCII letters and digits"
            ),
            AccountError::Secret(id) => {
                write!(f, "wechat account {id}: app_secret must not be empty")
            }
            AccountError::Token(id) => write!(
                f,
                "wechat account {id}: token must be 3..=32 ASCII letters and digits"
            ),
            AccountError::AesKey(id, e) => write!(f, "wechat account {id}: encoding_aes_key: {e}"),
            AccountError::AesKeyMissing(id) => write!(
                f,
                "wechat account {id}: mode safe or compatible needs encoding_aes_key"
            ),
            AccountError::ApiBase(id) => write!(
                f,
                "wechat account {id}: api_base must start with http:// or https://"
            ),
            AccountError::Duplicate(id) => write!(f, "wechat account {id} is configured twice"),
        }
    }
}

impl std::error::Error for AccountError {}

impl AccountSettings {
    pub fn check(&self) -> Result<Account, AccountError> {
        let id = &self.app_id;
        let alnum = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric());
        if id.is_empty() || id.len() > 64 || !alnum(id) {
            return Err(AccountError::AppId(id.clone()));
        }
        if self.app_secret.is_empty() {
            return Err(AccountError::Secret(id.clone()));
        }
        // The configuration page's rule for the Token.
        if !(3..=32).contains(&self.token.len()) || !alnum(&self.token) {
            return Err(AccountError::Token(id.clone()));
        }
        let aes_key = match &self.encoding_aes_key {
            Some(key) => Some(AesKey::parse(key).map_err(|e| AccountError::AesKey(id.clone(), e))?),
            None if self.mode == Mode::Plain => None,
            None => return Err(AccountError::AesKeyMissing(id.clone())),
        };
        let api_base = self.api_base.trim_end_matches('/');
        if !(api_base.starts_with("http://") || api_base.starts_with("https://")) {
            return Err(AccountError::ApiBase(id.clone()));
        }
        Ok(Account {
            app_id: id.clone(),
            app_secret: self.app_secret.clone(),
            token: self.token.clone(),
            aes_key,
            mode: self.mode,
            api_base: api_base.to_string(),
            shop: self.shop,
            kf_account: self.kf_account.clone(),
        })
    }
}

impl WechatSection {
    /// Checks every account; an app id may appear once.
    pub fn accounts(&self) -> Result<Vec<Account>, AccountError> {
        let mut accounts: Vec<Account> = Vec::with_capacity(self.accounts.len());
        for settings in &self.accounts {
            let account = settings.check()?;
            if accounts.iter().any(|a| a.app_id == account.app_id) {
                return Err(AccountError::Duplicate(account.app_id));
            }
            accounts.push(account);
        }
        Ok(accounts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(toml_text: &str) -> WechatSection {
        #[derive(Deserialize)]
        struct File {
            wechat: WechatSection,
        }
        toml::from_str::<File>(toml_text).unwrap().wechat
    }

    #[test]
    fn parses_several_accounts_with_defaults() {
        let wechat = section(
            r#"
            [wechat.sender]
            send_attempts_max = 3

            [[wechat.account]]
            app_id = "wx5823bf96d3bd56c7"
            app_secret = "s3cret"
            token = "QDG6eK"
            encoding_aes_key = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
            mode = "safe"
            shop = 42

            [[wechat.account]]
            app_id = "wxplain"
            app_secret = "other"
            token = "tok"
            shop = 7
            api_base = "http://127.0.0.1:9/"
            kf_account = "kf2001@gh_1"
            "#,
        );
        assert_eq!(wechat.sender.send_attempts_max, 3);
        let accounts = wechat.accounts().unwrap();
        assert_eq!(accounts.len(), 2);
        assert_eq!(accounts[0].mode, Mode::Safe);
        assert_eq!(accounts[0].api_base, API_BASE_DEFAULT);
        assert!(accounts[0].aes_key.is_some());
        assert_eq!(accounts[1].mode, Mode::Plain);
        assert_eq!(accounts[1].api_base, "http://127.0.0.1:9");
        assert_eq!(accounts[1].kf_account.as_deref(), Some("kf2001@gh_1"));
        // Secrets stay out of Debug output.
        let shown = format!("{:?} {:?}", wechat.accounts[0], accounts[0]);
        assert!(
            !shown.contains("s3cret") && !shown.contains("QDG6eK"),
            "{shown}"
        );
    }

    #[test]
    fn refuses_bad_accounts() {
        let base = AccountSettings {
            app_id: "wx1".into(),
            app_secret: "s".into(),
            token: "token".into(),
            encoding_aes_key: None,
            mode: Mode::Plain,
            api_base: api_base_default(),
            shop: 1,
            kf_account: None,
        };
        assert!(base.check().is_ok());
        let with = |f: &dyn Fn(&mut AccountSettings)| {
            let mut s = base.clone();
            f(&mut s);
            s.check().unwrap_err()
        };
        assert!(matches!(
            with(&|s| s.app_id = "wx 1".into()),
            AccountError::AppId(_)
        ));
        assert!(matches!(
            with(&|s| s.app_secret.clear()),
            AccountError::Secret(_)
        ));
        assert!(matches!(
            with(&|s| s.token = "ab".into()),
            AccountError::Token(_)
        ));
        assert!(matches!(
            with(&|s| s.mode = Mode::Safe),
            AccountError::AesKeyMissing(_)
        ));
        assert!(matches!(
            with(&|s| s.encoding_aes_key = Some("short".into())),
            AccountError::AesKey(_, KeyError::Length)
        ));
        assert!(matches!(
            with(&|s| s.api_base = "ftp://x".into()),
            AccountError::ApiBase(_)
        ));
        let twice = WechatSection {
            accounts: vec![base.clone(), base],
            sender: SenderLimits::default(),
        };
        assert!(matches!(twice.accounts(), Err(AccountError::Duplicate(_))));
    }

    #[test]
    fn refuses_unknown_keys() {
        #[derive(Deserialize, Debug)]
        struct File {
            #[allow(dead_code)]
            wechat: WechatSection,
        }
        let text = "[[wechat.account]]\napp_id = \"wx1\"\napp_secret = \"s\"\ntoken = \"tok\"\nshop = 1\ncolour = \"red\"\n";
        assert!(toml::from_str::<File>(text).is_err());
    }
}
