//! Reading requests: JSON bodies with protobuf or camelCase field names, and query strings whose
//! parameters may repeat (`?name=a&name=b`).

use super::code::{self, Entity};
use super::error::ApiError;
use crate::model::FieldError;
use crate::protojson::ProtoNames;

/// Parses a JSON body. Unparseable JSON is `PARSE` (checked before the shape, so `{bad` is not
/// "expected a sequence"); a value of the wrong shape names its path.
pub fn parse_json<T: serde::de::DeserializeOwned>(
    body: &[u8],
    entity: Entity,
) -> Result<T, ApiError> {
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        return Err(ApiError::new(code::PARSE, format!("body: {e}")));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(ProtoNames(&mut de)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = if path == "." {
            "body".to_string()
        } else {
            path
        };
        ApiError::field(
            entity,
            FieldError::new(field, format!("invalid request body: {inner}")),
        )
    })
}

/// [`parse_json`] for a batch endpoint: an error is answered in the batch shape.
pub fn parse_batch<T: serde::de::DeserializeOwned>(
    body: &[u8],
    entity: Entity,
) -> Result<Vec<T>, ApiError> {
    parse_json(body, entity).map_err(ApiError::in_batch)
}

/// Validates every item of a batch (all before any is applied); an error names its item.
pub fn each<T, U>(
    list: Vec<T>,
    entity: Entity,
    f: impl Fn(&T) -> Result<U, FieldError>,
) -> Result<Vec<U>, ApiError> {
    if list.is_empty() {
        return Err(ApiError::new(code::EMPTY_REQUEST, "the request array is empty").in_batch());
    }
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            f(t).map_err(|e| ApiError::field(entity, e.prefixed(&format!("[{i}]."))).in_batch())
        })
        .collect()
}

/// Query parameters in order; a name may repeat.
#[derive(Debug, Default)]
pub struct Params(Vec<(String, String)>);

impl Params {
    /// The parameters of `uri`.
    pub fn of(uri: &axum::http::Uri) -> Params {
        Params(
            form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name`.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// `name` parsed as `T`, if present; a value that does not parse is an error naming it.
    pub fn parsed<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, ApiError> {
        match self.get(name) {
            None | Some("") => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                ApiError::new(
                    code::INVALID_PARAMETER,
                    format!("query parameter {name}: {v:?} is not valid"),
                )
            }),
        }
    }

    /// `offset` and `limit` (default 100, at most 10,000).
    pub fn page(&self) -> Result<(usize, usize), ApiError> {
        let offset = self.parsed("offset")?.unwrap_or(0);
        let limit = self.parsed("limit")?.unwrap_or(100);
        if limit > 10_000 {
            return Err(ApiError::new(
                code::INVALID_PARAMETER,
                "query parameter limit: at most 10000",
            ));
        }
        Ok((offset, limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NamespaceInput;

    #[test]
    fn syntax_errors_are_parse_errors_whatever_shape_is_expected() {
        let e = parse_json::<Vec<NamespaceInput>>(b"{bad", Entity::Namespace).unwrap_err();
        assert_eq!(e.code, code::PARSE);
        let e =
            parse_json::<Vec<NamespaceInput>>(b"[{\"name\": 1}", Entity::Namespace).unwrap_err();
        assert_eq!(e.code, code::PARSE);
        // Well-formed JSON of the wrong shape is a bad field, named.
        let e = parse_json::<Vec<NamespaceInput>>(b"{}", Entity::Namespace).unwrap_err();
        assert_eq!(e.code, code::BAD_REQUEST);
        let e =
            parse_json::<Vec<NamespaceInput>>(b"[{\"name\": 1}]", Entity::Namespace).unwrap_err();
        assert_eq!(e.code, code::INVALID_NAMESPACE_NAME);
        assert!(e.detail.contains("[0].name"), "{}", e.detail);
    }

    #[test]
    fn repeated_query_parameters() {
        let p = Params::of(&"/x?name=a&name=b%2Fc&limit=5".parse().unwrap());
        assert_eq!(p.all("name"), vec!["a", "b/c"]);
        assert_eq!(p.page().unwrap(), (0, 5));
        assert!(Params::of(&"/x?limit=x".parse().unwrap()).page().is_err());
    }
}
