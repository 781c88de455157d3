#!/usr/bin/env bash
# Self-signed certificates and SuperNode keys for a TEST Flower deployment (never for production):
#
#   scripts/make_certs.sh OUTDIR [HOST...]        (SUPERNODES=N for N SuperNode key pairs; default 3)
#
# writes into OUTDIR
#   ca.crt, ca.key             a throw-away certificate authority (30 days)
#   server.pem, server.key     the SuperLink's certificate, signed by it; SAN: localhost, 127.0.0.1
#                              and every HOST given (a name or an IPv4 address of the coordinator)
#   supernode-<i>, .pub        ECDSA P-384 OpenSSH key pairs for SuperNode authentication: start
#                              SuperNode i with --auth-supernode-private-key supernode-<i>, and
#                              register supernode-<i>.pub with `flwr supernode register` first
# SuperLink: --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key
# SuperNodes and the flwr CLI trust ca.crt (--root-certificates / root-certificates in config.toml).
# Keep ca.key and the SuperNode private keys secret; see docs/deployment.md.
set -euo pipefail
out=${1:?usage: make_certs.sh OUTDIR [HOST...]}
shift
n=${SUPERNODES:-3}
command -v openssl >/dev/null || { echo "make_certs.sh: openssl not found" >&2; exit 1; }
command -v ssh-keygen >/dev/null || { echo "make_certs.sh: ssh-keygen not found (openssh-client)" >&2; exit 1; }
mkdir -p "$out"
cd "$out"
san="DNS:localhost,IP:127.0.0.1"
for host in "$@"; do
  if [[ $host =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; then san="$san,IP:$host"; else san="$san,DNS:$host"; fi
done
# EC P-256 keys: generated in milliseconds (RSA 4096 takes seconds) and accepted by every TLS stack
openssl ecparam -name prime256v1 -genkey -noout -out ca.key
openssl req -new -x509 -key ca.key -sha256 -days 30 -subj "/CN=iopfl test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt
openssl ecparam -name prime256v1 -genkey -noout -out server.key
openssl req -new -key server.key -subj "/CN=localhost" -out server.csr
printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" \
  "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -sha256 \
  -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 600 ca.key server.key
for i in $(seq 1 "$n"); do
  rm -f "supernode-$i" "supernode-$i.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "iopfl-supernode-$i" -f "supernode-$i"
done
echo "wrote $out: ca.crt ca.key server.pem server.key supernode-{1..$n}{,.pub} (SAN $san)"
