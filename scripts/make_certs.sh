#!/usr/bin/env bash
# Self-signed certificates for a TEST Flower deployment (never for production):
#   scripts/make_certs.sh OUTDIR [HOST...]
# writes OUTDIR/ca.crt, ca.key, server.pem, server.key (SAN: localhost, 127.0.0.1 and any HOST given)
# and OUTDIR/supernode-<i>{,.pub} key pairs plus OUTDIR/supernode_keys.csv for SuperNode authentication.
set -euo pipefail
out=${1:?usage: make_certs.sh OUTDIR [HOST...]}
shift || true
mkdir -p "$out"
cd "$out"
san="DNS:localhost,IP:127.0.0.1"
for host in "$@"; do
  if [[ $host =~ ^[0-9.]+$ ]]; then san="$san,IP:$host"; else san="$san,DNS:$host"; fi
done
openssl genrsa -out ca.key 4096 2>/dev/null
openssl req -new -x509 -key ca.key -sha256 -days 30 -subj "/CN=iopfl test CA" -out ca.crt
openssl genrsa -out server.key 4096 2>/dev/null
openssl req -new -key server.key -subj "/CN=localhost" -out server.csr
printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -sha256 \
  -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
: > supernode_keys.csv
for i in 1 2 3; do
  ssh-keygen -q -t ecdsa -b 384 -N "" -f "supernode-$i" -C "iopfl-supernode-$i" <<<y >/dev/null
  cat "supernode-$i.pub" >> supernode_keys.csv
done
echo "wrote $out: ca.crt server.pem server.key supernode-{1,2,3}[.pub] supernode_keys.csv"
