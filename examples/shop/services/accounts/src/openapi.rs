//! The API description served at `/openapi.json`.

use flotilla_chassis::openapi::{error_response, error_schema};
use serde_json::{Value, json};

/// OpenAPI 3.0.3 for the accounts routes.
pub fn document() -> Value {
    let body = |schema: &str| json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
    let tokens = json!({
        "description": "An access token and a new refresh token (Cache-Control: no-store): in the body (Tokens), or for a cookie session in HttpOnly cookies only (CookieSession)",
        "headers": {"Set-Cookie": {
            "description": "A cookie session's cookies: shop_at (the access token; HttpOnly, SameSite=Strict, Path=/api, Max-Age=900), shop_rt (the refresh token; HttpOnly, SameSite=Strict, Path=/api/accounts) and shop_session (the access token's expiry in Unix seconds, readable by the page). Secure when the client's connection was HTTPS.",
            "schema": {"type": "string"}
        }},
        "content": {"application/json": {"schema": {"oneOf": [
            {"$ref": "#/components/schemas/Tokens"},
            {"$ref": "#/components/schemas/CookieSession"}
        ]}}}
    });
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "shop-accounts",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Shop accounts: registration with argon2id-hashed passwords, login returning a 15-minute EdDSA access JWT and a rotating refresh token, and the JWKS that verifies the access tokens. Reusing a spent refresh token revokes its whole family, unless it is a retry within the reuse grace (10 s by default) while its successor is unused."
        },
        "paths": {
            "/api/accounts/register": {
                "post": {
                    "operationId": "register",
                    "summary": "Create an account",
                    "requestBody": body("Register"),
                    "responses": {
                        "201": {"description": "Created", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/User"}}}},
                        "400": error_response("invalid_request: field errors for email, password or name"),
                        "409": error_response("email_taken"),
                        "422": error_response("invalid_json: the body is not the expected JSON"),
                        "503": error_response("busy: too many password hashes at once")
                    }
                }
            },
            "/api/accounts/login": {
                "post": {
                    "operationId": "login",
                    "summary": "Exchange e-mail and password for tokens",
                    "requestBody": body("Login"),
                    "responses": {
                        "200": tokens.clone(),
                        "400": error_response("invalid_request: missing or malformed email or password"),
                        "401": error_response("invalid_credentials: unknown e-mail or wrong password (one answer for both)"),
                        "403": error_response("cross_origin_request: a cookie session asked for from a page of another origin"),
                        "429": error_response("too_many_attempts: this e-mail address has had too many failed sign-ins (with or without an account); Retry-After says when to try again"),
                        "503": error_response("busy, or signing_unavailable")
                    }
                }
            },
            "/api/accounts/refresh": {
                "post": {
                    "operationId": "refresh",
                    "summary": "Exchange a refresh token for new tokens; the presented one is spent",
                    "description": "The token is the body's refresh_token, else the shop_rt cookie's; the new tokens go where the presented one came from. A refused cookie is cleared, except when two different ones came (ambiguous_session: neither is spent nor cleared). An access token already issued stays valid until it expires.",
                    "requestBody": body("RefreshToken"),
                    "responses": {
                        "200": tokens,
                        "400": error_response("invalid_request: refresh_token missing (from the body and the cookies); too_many_sessions: more than 4 shop_rt cookies"),
                        "401": error_response("invalid_refresh_token (unknown, expired or revoked), refresh_token_reused (already spent, and not a retry within the reuse grace: its whole family is now revoked), or ambiguous_session (two different shop_rt cookies: nothing spent)"),
                        "403": error_response("cross_origin_request: the cookie presented from a page of another origin (nothing is spent)"),
                        "503": error_response("signing_unavailable: no key may sign yet (nothing is spent)")
                    }
                }
            },
            "/api/accounts/logout": {
                "post": {
                    "operationId": "logout",
                    "summary": "Revoke the refresh token's family",
                    "description": "The token is the body's refresh_token, else the shop_rt cookie's; a cookie session's cookies are cleared.",
                    "requestBody": body("RefreshToken"),
                    "responses": {
                        "204": {"description": "Logged out (also when the token was unknown)"},
                        "400": error_response("invalid_request: refresh_token missing (from the body and the cookies); too_many_sessions: more than 4 shop_rt cookies"),
                        "403": error_response("cross_origin_request: the cookie presented from a page of another origin")
                    }
                }
            },
            "/api/accounts/me": {
                "get": {
                    "operationId": "me",
                    "summary": "The signed-in user",
                    "description": "The user comes from x-flotilla-user-id, which the gateway sets after verifying the access token.",
                    "parameters": [{"name": "x-flotilla-user-id", "in": "header", "required": true, "schema": {"type": "string"}}],
                    "responses": {
                        "200": {"description": "The user", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Me"}}}},
                        "401": error_response("unauthenticated")
                    }
                }
            },
            "/.well-known/jwks.json": {
                "get": {
                    "operationId": "jwks",
                    "summary": "The public keys that verify access tokens (RFC 7517)",
                    "description": "Keys about to sign, signing, and retired ones whose tokens may still be valid. Cache-Control: max-age=60.",
                    "responses": {
                        "200": {"description": "The key set", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Jwks"}}}}
                    }
                }
            }
        },
        "components": {
            "schemas": {
                "Register": {
                    "type": "object",
                    "required": ["email", "password"],
                    "properties": {
                        "email": {"type": "string", "format": "email", "maxLength": 254, "example": "alice@example.com"},
                        "password": {"type": "string", "format": "password", "minLength": 10, "description": "At least 10 characters, at most 1024 bytes, not the e-mail address"},
                        "name": {"type": "string", "maxLength": 100, "nullable": true}
                    }
                },
                "Login": {
                    "type": "object",
                    "required": ["email", "password"],
                    "properties": {
                        "email": {"type": "string", "format": "email"},
                        "password": {"type": "string", "format": "password"},
                        "session": {"type": "string", "enum": ["token", "cookie"], "default": "token", "description": "Where the tokens go: the response body, or HttpOnly cookies (a browser's session, which no script on the page can read)"}
                    }
                },
                "RefreshToken": {
                    "type": "object",
                    "properties": {"refresh_token": {"type": "string", "description": "Required unless the request carries the shop_rt cookie"}}
                },
                "CookieSession": {
                    "type": "object",
                    "required": ["session", "expires_in"],
                    "properties": {
                        "session": {"type": "string", "enum": ["cookie"]},
                        "expires_in": {"type": "integer", "example": 900}
                    }
                },
                "Tokens": {
                    "type": "object",
                    "required": ["access_token", "token_type", "expires_in", "refresh_token"],
                    "properties": {
                        "access_token": {"type": "string", "description": "EdDSA JWT: iss, aud, sub, email, scope, iat, nbf, exp, jti; header kid"},
                        "token_type": {"type": "string", "enum": ["Bearer"]},
                        "expires_in": {"type": "integer", "example": 900},
                        "refresh_token": {"type": "string", "description": "Opaque; single use"}
                    }
                },
                "User": {
                    "type": "object",
                    "required": ["id", "email", "created_at"],
                    "properties": {
                        "id": {"type": "string", "format": "uuid"},
                        "email": {"type": "string", "format": "email"},
                        "name": {"type": "string", "nullable": true},
                        "created_at": {"type": "string", "format": "date-time"}
                    }
                },
                "Me": {
                    "type": "object",
                    "required": ["id", "email"],
                    "properties": {
                        "id": {"type": "string", "format": "uuid"},
                        "email": {"type": "string", "format": "email"},
                        "name": {"type": "string", "nullable": true}
                    }
                },
                "Jwks": {
                    "type": "object",
                    "required": ["keys"],
                    "properties": {"keys": {"type": "array", "items": {
                        "type": "object",
                        "required": ["kty", "crv", "x", "kid", "alg", "use"],
                        "properties": {
                            "kty": {"type": "string", "enum": ["OKP"]},
                            "crv": {"type": "string", "enum": ["Ed25519"]},
                            "x": {"type": "string"},
                            "kid": {"type": "string"},
                            "alg": {"type": "string", "enum": ["EdDSA"]},
                            "use": {"type": "string", "enum": ["sig"]}
                        }
                    }}}
                },
                "Error": error_schema()
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn lists_every_route_with_described_responses() {
        let doc = super::document();
        assert_eq!(doc["openapi"], "3.0.3");
        let paths = doc["paths"].as_object().unwrap();
        for (path, method) in [
            ("/api/accounts/register", "post"),
            ("/api/accounts/login", "post"),
            ("/api/accounts/refresh", "post"),
            ("/api/accounts/logout", "post"),
            ("/api/accounts/me", "get"),
            ("/.well-known/jwks.json", "get"),
        ] {
            let op = &paths[path][method];
            assert!(op.is_object(), "{method} {path}");
            for (status, response) in op["responses"].as_object().unwrap() {
                assert!(
                    response["description"].is_string(),
                    "{method} {path} {status}"
                );
            }
        }
        assert_eq!(paths.len(), 6);
    }
}
