//! `Debug` for the structs that hold clients, pools or secrets: the
//! fields worth reading in a log, then `..` for the rest.

/// Implements `Debug` for a struct by showing only the named fields and
/// closing with `..` (`finish_non_exhaustive`): the others are clients,
/// pools or secrets, which have no useful (or no safe) `Debug`.
///
/// ```
/// struct Client {
///     region: String,
///     token: String,
/// }
/// chat_shared::debug_fields!(Client { region });
///
/// let c = Client { region: "eu-west-1".into(), token: "secret".into() };
/// assert_eq!(format!("{c:?}"), r#"Client { region: "eu-west-1", .. }"#);
/// ```
#[macro_export]
macro_rules! debug_fields {
    ($ty:ident { $($field:ident),* $(,)? }) => {
        impl ::std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.debug_struct(stringify!($ty))
                    $(.field(stringify!($field), &self.$field))*
                    .finish_non_exhaustive()
            }
        }
    };
}
