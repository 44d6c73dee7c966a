#!/usr/bin/env bash
# Knocks on an instance of a running Flotilla system with `openssl s_client`
# and shows that everything but a trusted, allowed identity is refused:
# plaintext, no client certificate, TLS 1.2, a certificate from a foreign CA,
# an expired certificate from the system's own CA, and a valid identity the
# ACL does not allow. The last line, a call as the runtime (allowed on
# /readyz), shows that the same door does open for the right peer.
#
# Usage (from the repository root, with the shop running):
#   cargo run --release -- up examples/shop/flotilla.toml &
#   benches/mesh/openssl-refusals.sh [DATA_DIR] [SERVICE] [WRONG_IDENTITY_DIR]
#
#   DATA_DIR            the system's data dir (default examples/shop/.flotilla)
#   SERVICE             the service to knock on (default orders)
#   WRONG_IDENTITY_DIR  a valid identity the service's ACL refuses
#                       (default DATA_DIR/run/catalog-0: catalog does not call orders)
#
# Needs openssl, curl and jq. Exits non-zero if anything was let in.
set -euo pipefail

DATA=${1:-examples/shop/.flotilla}
SERVICE=${2:-orders}
WRONG=${3:-$DATA/run/catalog-0}
ENDPOINTS=$DATA/endpoints.json
[ -f "$ENDPOINTS" ] || { echo "no $ENDPOINTS: is the system running (flotilla up)?" >&2; exit 2; }
SYSTEM=$(jq -r .system "$ENDPOINTS")
ADDR=$(jq -r --arg s "$SERVICE" '.services[$s].instances[0].address' "$ENDPOINTS" | sed 's|^https://||')
[ "$ADDR" != null ] || { echo "no ready instance of $SERVICE in $ENDPOINTS" >&2; exit 2; }
RUNTIME=$DATA/run/runtime
BUNDLE=$RUNTIME/ca.crt
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
FAILED=0

# One request over TLS; prints what came back (application data and errors).
knock() { # knock PATH [s_client options...]
  local path=$1; shift
  printf 'GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$path" "$SERVICE" |
    timeout 10 openssl s_client -connect "$ADDR" -CAfile "$BUNDLE" -quiet "$@" 2>&1 |
    grep -v -e "Can't use SSL_get_servername" -e '^depth=' -e '^verify return' || true
}

# s_client options presenting the certificate chain in FILE with KEY (-cert
# alone would send only the leaf, not the intermediate that links it to
# the root).
as() { echo -cert "$1" -cert_chain "$1" -key "$2"; }

refused() { # refused NAME OUTPUT
  local first
  first=$(printf '%s\n' "$2" | grep -m1 -Ei 'alert|error|HTTP/1' || true)
  if printf '%s' "$2" | grep -q '^HTTP/1\.[01] [23]'; then
    printf 'LET IN   %-34s %s\n' "$1" "$first"; FAILED=1
  else
    printf 'refused  %-34s %s\n' "$1" "${first:-connection closed}"
  fi
}

echo "knocking on $SERVICE at $ADDR (system $SYSTEM)"

# 1. Plaintext HTTP.
out=$(curl -sS --max-time 5 "http://$ADDR/readyz" 2>&1 || true)
refused "plaintext HTTP" "$out"

# 2. TLS without a client certificate.
refused "no client certificate" "$(knock /readyz -tls1_3)"

# 3. TLS 1.2, even with the runtime's own certificate.
refused "TLS 1.2" "$(knock /readyz -tls1_2 $(as "$RUNTIME/tls.crt" "$RUNTIME/tls.key"))"

# 4. A foreign CA's certificate claiming to be the runtime.
SAN="URI:spiffe://$SYSTEM.flotilla/ns/local/svc/runtime"
openssl ecparam -name prime256v1 -genkey -noout -out "$WORK/foreign-ca.key"
openssl req -x509 -new -key "$WORK/foreign-ca.key" -subj /CN=foreign-root -days 1 -out "$WORK/foreign-ca.crt"
openssl ecparam -name prime256v1 -genkey -noout -out "$WORK/foreign.key"
openssl req -new -key "$WORK/foreign.key" -subj /CN=runtime -out "$WORK/foreign.csr"
printf 'subjectAltName=%s\nextendedKeyUsage=clientAuth,serverAuth\n' "$SAN" >"$WORK/leaf.ext"
openssl x509 -req -in "$WORK/foreign.csr" -CA "$WORK/foreign-ca.crt" -CAkey "$WORK/foreign-ca.key" \
  -CAcreateserial -days 1 -extfile "$WORK/leaf.ext" -out "$WORK/foreign.crt" 2>/dev/null
cat "$WORK/foreign-ca.crt" >>"$WORK/foreign.crt"
refused "foreign CA" "$(knock /readyz -tls1_3 $(as "$WORK/foreign.crt" "$WORK/foreign.key"))"

# 5. An expired certificate signed by the system's own intermediate.
GEN=$(ls -d "$DATA"/ca/gen-* | sort -V | tail -1)
mkdir -p "$WORK/ca/new"; : >"$WORK/ca/index.txt"; echo 1000 >"$WORK/ca/serial"
cat >"$WORK/ca.cnf" <<CNF
[ca]
default_ca = mini
[mini]
dir = $WORK/ca
database = \$dir/index.txt
new_certs_dir = \$dir/new
serial = \$dir/serial
default_md = sha256
policy = anything
copy_extensions = none
[anything]
commonName = supplied
CNF
openssl ecparam -name prime256v1 -genkey -noout -out "$WORK/expired.key"
openssl req -new -key "$WORK/expired.key" -subj /CN=runtime -out "$WORK/expired.csr"
openssl ca -batch -config "$WORK/ca.cnf" -cert "$GEN/intermediate.crt" -keyfile "$GEN/intermediate.key" \
  -startdate 20200101000000Z -enddate 20200102000000Z -extfile "$WORK/leaf.ext" \
  -in "$WORK/expired.csr" -out "$WORK/expired.pem" 2>/dev/null
openssl x509 -in "$WORK/expired.pem" -out "$WORK/expired.crt"
cat "$GEN/intermediate.crt" >>"$WORK/expired.crt"
refused "expired certificate (own CA)" "$(knock /readyz -tls1_3 $(as "$WORK/expired.crt" "$WORK/expired.key"))"

# 6. A valid identity of the system that the ACL does not allow.
WRONG_ID=$(openssl x509 -in "$WRONG/tls.crt" -noout -ext subjectAltName 2>/dev/null | grep -o 'spiffe://[^ ,]*' || echo "$WRONG")
out=$(knock "/api/$SERVICE" -tls1_3 $(as "$WRONG/tls.crt" "$WRONG/tls.key"))
if printf '%s' "$out" | grep -Eq '"code": ?"acl_denied"'; then
  printf 'refused  %-34s %s\n' "wrong identity" "403 acl_denied for $WRONG_ID"
else
  printf 'LET IN   %-34s %s\n' "wrong identity" "$(printf '%s\n' "$out" | head -1)"; FAILED=1
fi

# The right identity on a path it may use: the door works.
out=$(knock /readyz -tls1_3 $(as "$RUNTIME/tls.crt" "$RUNTIME/tls.key"))
printf 'allowed  %-34s %s\n' "the runtime on /readyz" "$(printf '%s\n' "$out" | grep -m1 '^HTTP/1' || echo "no answer: $out")"

exit $FAILED
