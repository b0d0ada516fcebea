//! The OpenAPI 3 document, generated from the route table and the error table.

use serde_json::{json, Map, Value};

use crate::error::ALL_KINDS;
use crate::routes::{Access, ParamType, Route};

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn json_content(name: &str) -> Value {
    json!({"application/json": {"schema": schema_ref(name)}})
}

fn param_schema(ty: ParamType) -> Value {
    match ty {
        ParamType::Uuid => json!({"type": "string", "format": "uuid"}),
        ParamType::DateTime => json!({"type": "string", "format": "date-time"}),
        ParamType::Integer { min, max } => {
            json!({"type": "integer", "minimum": min, "maximum": max})
        }
        ParamType::Text => json!({"type": "string"}),
        ParamType::Enum(values) => json!({"type": "string", "enum": values}),
    }
}

fn status_text(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No content",
        _ => "Success",
    }
}

fn operation(route: &Route) -> Value {
    let mut params: Vec<Value> = route
        .path
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| {
            json!({"name": name, "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"},
                   "description": "malformed, unknown and other organizations' ids all answer 404"})
        })
        .collect();
    params.extend(route.query.iter().map(|p| {
        json!({"name": p.name, "in": "query", "required": false, "schema": param_schema(p.ty), "description": p.description})
    }));

    let mut responses = Map::new();
    let (ok, ok_schema) = route.ok;
    let mut ok_body = json!({"description": status_text(ok)});
    if let Some(name) = ok_schema {
        ok_body["content"] = json_content(name);
    } else if route.operation_id == "openapi" {
        ok_body["content"] = json!({"application/json": {"schema": {"type": "object"}}});
    }
    responses.insert(ok.to_string(), ok_body);
    for status in route.error_statuses() {
        let codes: Vec<String> = ALL_KINDS
            .iter()
            .filter(|k| k.status == status)
            .map(|k| format!("`{}`: {}", k.code, k.meaning))
            .collect();
        responses.insert(
            status.to_string(),
            json!({"description": codes.join("; "), "content": json_content("Error")}),
        );
    }

    let access = match route.access {
        Access::Public => "Public.".to_owned(),
        Access::Session => "Requires a session.".to_owned(),
        Access::Org(role) => format!(
            "Requires the `{}` role or higher in the organization.",
            role.as_str()
        ),
    };
    let mut op = json!({
        "operationId": route.operation_id,
        "summary": route.summary,
        "description": access,
        "tags": [route.tag],
        "parameters": params,
        "responses": responses,
    });
    if route.access != Access::Public {
        op["security"] = json!([{"bearer": []}]);
    }
    if let Some(body) = route.body {
        op["requestBody"] = json!({"required": true, "content": json_content(body)});
    }
    op
}

/// The whole document.
pub fn document(routes: &[Route]) -> Value {
    let mut paths = Map::new();
    for route in routes {
        let item = paths.entry(route.path).or_insert_with(|| json!({}));
        item[route.method.as_str().to_ascii_lowercase()] = operation(route);
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "llmgw settings API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Accounts, organizations, members, custom providers, gateway API keys, usage and audit. \
                Send `Authorization: Bearer <token>` from signup/login. Errors: \
                `{\"error\":{\"code\",\"message\",\"details\":[{\"field\",\"message\"}]}}`.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas(),
        },
    })
}

fn list_of(item: &str) -> Value {
    json!({
        "type": "object",
        "required": ["data", "next_cursor"],
        "properties": {
            "data": {"type": "array", "items": schema_ref(item)},
            "next_cursor": {"type": "string", "nullable": true, "description": "pass as `cursor` for the next page; null on the last"},
        },
    })
}

fn schemas() -> Value {
    let uuid = json!({"type": "string", "format": "uuid"});
    let time = json!({"type": "string", "format": "date-time"});
    let time_or_null = json!({"type": "string", "format": "date-time", "nullable": true});
    let role = json!({"type": "string", "enum": ["owner", "admin", "member"]});
    let status = json!({"type": "string", "enum": ["active", "inactive"]});
    let provider_name = json!({"type": "string", "pattern": "^[a-z]+$", "maxLength": 64,
        "description": "lowercase a-z only, unique in the organization; used as `{name}/{model}` at the gateway"});
    let base_url = json!({"type": "string", "format": "uri",
        "description": "https URL with a host, no userinfo, query or fragment, not ending in /v1 \
            (the gateway appends /v1/chat/completions); must not resolve to a private address unless \
            LLMGW_UPSTREAM_ALLOW_PRIVATE=true"});
    let token = json!({"type": "string", "writeOnly": true, "minLength": 1, "maxLength": 4096,
        "description": "the provider's API token: printable ASCII; never returned"});
    let int = json!({"type": "integer", "format": "int64"});
    let int_or_null = json!({"type": "integer", "format": "int64", "nullable": true});
    let str_or_null = json!({"type": "string", "nullable": true});
    let entries: Vec<(&str, Value)> = vec![
        (
            "Error",
            json!({
                "type": "object",
                "required": ["error"],
                "properties": {"error": {
                    "type": "object",
                    "required": ["code", "message", "details"],
                    "properties": {
                        "code": {"type": "string", "enum": ALL_KINDS.iter().map(|k| k.code).collect::<Vec<_>>()},
                        "message": {"type": "string"},
                        "details": {"type": "array", "items": {
                            "type": "object",
                            "required": ["field", "message"],
                            "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                        }},
                    },
                }},
            }),
        ),
        (
            "Status",
            json!({"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}),
        ),
        (
            "Signup",
            json!({
                "type": "object", "additionalProperties": false, "required": ["email", "password"],
                "properties": {"email": {"type": "string", "format": "email"},
                               "password": {"type": "string", "format": "password", "minLength": 8, "maxLength": 1024, "writeOnly": true}},
            }),
        ),
        (
            "Login",
            json!({
                "type": "object", "additionalProperties": false, "required": ["email", "password"],
                "properties": {"email": {"type": "string"}, "password": {"type": "string", "format": "password", "writeOnly": true}},
            }),
        ),
        (
            "User",
            json!({
                "type": "object", "required": ["id", "email"],
                "properties": {"id": uuid, "email": {"type": "string"}},
            }),
        ),
        (
            "Session",
            json!({
                "type": "object", "required": ["token", "expires_at", "user"],
                "properties": {"token": {"type": "string", "description": "bearer token; shown only here"},
                               "expires_at": time, "user": schema_ref("User")},
            }),
        ),
        (
            "OrgInput",
            json!({
                "type": "object", "additionalProperties": false, "required": ["name"],
                "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 200}},
            }),
        ),
        (
            "Org",
            json!({
                "type": "object", "required": ["id", "name", "role", "created_at"],
                "properties": {"id": uuid, "name": {"type": "string"}, "role": role, "created_at": time},
            }),
        ),
        ("OrgList", list_of("Org")),
        (
            "Invite",
            json!({
                "type": "object", "additionalProperties": false, "required": ["email"],
                "properties": {"email": {"type": "string", "format": "email", "maxLength": 320,
                                         "description": "the invitee's address; it need not have an account yet"},
                               "role": {"type": "string", "enum": ["owner", "admin", "member"], "default": "member"}},
            }),
        ),
        (
            "Invitation",
            json!({
                "type": "object",
                "required": ["id", "org_id", "email", "role", "invited_by", "created_at", "expires_at"],
                "properties": {"id": uuid, "org_id": uuid, "email": {"type": "string"}, "role": role,
                               "invited_by": {"type": "string", "format": "uuid", "nullable": true},
                               "created_at": time,
                               "expires_at": {"type": "string", "format": "date-time", "description": "7 days after creation"}},
            }),
        ),
        (
            "InvitationCreated",
            json!({
                "allOf": [schema_ref("Invitation"), {
                    "type": "object", "required": ["token"],
                    "properties": {"token": {"type": "string", "description": "`llmgwi_…`: shown only in this answer; \
                        the invitee accepts with it"}},
                }],
            }),
        ),
        ("InvitationList", list_of("Invitation")),
        (
            "InvitationAccept",
            json!({
                "type": "object", "additionalProperties": false, "required": ["token"],
                "properties": {"token": {"type": "string", "minLength": 1, "writeOnly": true,
                                         "description": "the token from the invitation's creation answer"}},
            }),
        ),
        (
            "MemberRemoved",
            json!({
                "type": "object", "required": ["revoked_api_keys", "transferred_api_keys"],
                "properties": {"revoked_api_keys": {"type": "integer", "minimum": 0},
                               "transferred_api_keys": {"type": "integer", "minimum": 0}},
            }),
        ),
        (
            "MemberPatch",
            json!({
                "type": "object", "additionalProperties": false, "required": ["role"],
                "properties": {"role": role},
            }),
        ),
        (
            "Member",
            json!({
                "type": "object", "required": ["user_id", "email", "role", "created_at"],
                "properties": {"user_id": uuid, "email": {"type": "string"}, "role": role, "created_at": time},
            }),
        ),
        ("MemberList", list_of("Member")),
        (
            "ProviderKeyCreate",
            json!({
                "type": "object", "additionalProperties": false, "required": ["name", "base_url", "token"],
                "properties": {"name": provider_name, "base_url": base_url, "token": token},
            }),
        ),
        (
            "ProviderKeyPatch",
            json!({
                "type": "object", "additionalProperties": false, "minProperties": 1,
                "properties": {"name": provider_name, "base_url": base_url, "token": token, "status": status},
            }),
        ),
        (
            "ProviderKey",
            json!({
                "type": "object",
                "required": ["id", "name", "base_url", "token_hint", "status", "created_at", "updated_at"],
                "properties": {"id": uuid, "name": {"type": "string"}, "base_url": {"type": "string"},
                               "token_hint": {"type": "string", "description": "last 4 characters of the token"},
                               "status": status, "created_at": time, "updated_at": time},
            }),
        ),
        ("ProviderKeyList", list_of("ProviderKey")),
        (
            "ProviderTest",
            json!({
                "type": "object", "required": ["reachable", "status", "latency_ms", "model_count", "error"],
                "properties": {"reachable": {"type": "boolean"},
                               "status": {"type": "integer", "nullable": true, "description": "the provider's HTTP status"},
                               "latency_ms": int,
                               "model_count": {"type": "integer", "nullable": true},
                               "error": str_or_null},
            }),
        ),
        (
            "ApiKeyCreate",
            json!({
                "type": "object", "additionalProperties": false, "required": ["name"],
                "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 200},
                               "expires_at": {"type": "string", "format": "date-time", "nullable": true, "description": "in the future; omit for no expiry"}},
            }),
        ),
        (
            "ApiKey",
            json!({
                "type": "object",
                "required": ["id", "name", "prefix", "created_at", "expires_at", "last_used_at", "revoked_at"],
                "properties": {"id": uuid, "name": {"type": "string"}, "prefix": {"type": "string"},
                               "created_at": time, "expires_at": time_or_null, "last_used_at": time_or_null, "revoked_at": time_or_null},
            }),
        ),
        (
            "ApiKeyCreated",
            json!({
                "allOf": [schema_ref("ApiKey"), {
                    "type": "object", "required": ["key"],
                    "properties": {"key": {"type": "string", "description": "`llmgw_…`: shown only in this answer"}},
                }],
            }),
        ),
        ("ApiKeyList", list_of("ApiKey")),
        (
            "RequestLog",
            json!({
                "type": "object",
                "required": ["id", "request_id", "org_id", "status_code", "streamed", "canceled", "latency_ms", "created_at"],
                "properties": {
                    "id": uuid, "request_id": {"type": "string"}, "org_id": uuid,
                    "api_key_id": {"type": "string", "format": "uuid", "nullable": true},
                    "provider_key_id": {"type": "string", "format": "uuid", "nullable": true},
                    "provider_name": str_or_null, "requested_model": str_or_null, "upstream_model": str_or_null,
                    "status_code": {"type": "integer"}, "streamed": {"type": "boolean"}, "canceled": {"type": "boolean"},
                    "prompt_tokens": int_or_null, "completion_tokens": int_or_null, "total_tokens": int_or_null,
                    "latency_ms": {"type": "integer"}, "ttfb_ms": {"type": "integer", "nullable": true},
                    "error_class": str_or_null, "created_at": time,
                },
            }),
        ),
        ("RequestLogList", list_of("RequestLog")),
        (
            "UsageRow",
            json!({
                "type": "object",
                "required": ["key", "requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens", "p50_latency_ms", "p95_latency_ms"],
                "properties": {
                    "key": {"type": "string", "nullable": true, "description": "the day (YYYY-MM-DD), model, provider or API key id"},
                    "requests": int, "errors": int, "prompt_tokens": int, "completion_tokens": int, "total_tokens": int,
                    "p50_latency_ms": {"type": "number", "nullable": true}, "p95_latency_ms": {"type": "number", "nullable": true},
                },
            }),
        ),
        (
            "Usage",
            json!({
                "type": "object", "required": ["from", "to", "group_by", "data"],
                "properties": {"from": time, "to": time,
                               "group_by": {"type": "string", "enum": ["day", "model", "provider", "api_key"]},
                               "data": {"type": "array", "items": schema_ref("UsageRow")}},
            }),
        ),
        (
            "AuditEntry",
            json!({
                "type": "object",
                "required": ["id", "org_id", "actor_user_id", "action", "target_type", "target_id", "details", "created_at"],
                "properties": {
                    "id": uuid, "org_id": uuid,
                    "actor_user_id": {"type": "string", "format": "uuid", "nullable": true, "description": "null: the CLI or the system"},
                    "action": {"type": "string", "example": "provider_key.update"},
                    "target_type": {"type": "string"},
                    "target_id": {"type": "string", "format": "uuid", "nullable": true},
                    "details": {"type": "object", "description": "what changed; never a secret"},
                    "created_at": time,
                },
            }),
        ),
        ("AuditList", list_of("AuditEntry")),
    ];
    Value::Object(
        entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::routes;

    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|v| refs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    #[test]
    fn every_reference_resolves_and_every_schema_is_used() {
        let doc = document(&routes());
        let mut found = Vec::new();
        refs(&doc, &mut found);
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for r in &found {
            let name = r.strip_prefix("#/components/schemas/").unwrap();
            assert!(schemas.contains_key(name), "dangling {r}");
        }
        for name in schemas.keys() {
            assert!(
                found.iter().any(|r| r.ends_with(&format!("/{name}"))),
                "unused schema {name}"
            );
        }
    }

    #[test]
    fn operation_ids_are_unique_and_errors_documented() {
        let routes = routes();
        let mut ids: Vec<_> = routes.iter().map(|r| r.operation_id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), routes.len());
        for r in &routes {
            for s in r.error_statuses() {
                assert!(
                    ALL_KINDS.iter().any(|k| k.status == s),
                    "{} lists undocumented status {s}",
                    r.operation_id
                );
            }
        }
    }
}
