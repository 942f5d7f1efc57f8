"""An independent check of Kame's issuance transparency log, written from RFC 6962 and RFC 9162
with Python's `cryptography` and the standard library (none of Kame's code).

usage: ct_check.py LOG_KEY_PEM BASE_URL STH_FILE (CERT_PEM | TOKEN.jwt)...

Each CERT_PEM holds an X509-SVID and the certificate that issued it. Each TOKEN.jwt holds a
JWT-SVID whose last claim `kame_scts` is its SCT list (base64 of RFC 6962's TLS encoding); the
logged entry (type 0x8001) is the token's signing input with that claim taken off the claims. For each SVID it checks
the embedded SCT's signature over the RFC 6962 digitally-signed struct (the precertificate TBS
is `cryptography`'s `tbs_precertificate_bytes`), rebuilds the MerkleTreeLeaf, and checks its
inclusion in the log's current tree head through get-proof-by-hash. It checks the tree head's
signature, and its consistency with the tree head saved in STH_FILE by an earlier run (then
saves the current one there). Prints one line per check; exits 1 on the first failure.
"""

import base64
import datetime
import hashlib
import json
import struct
import sys
import urllib.parse
import urllib.request

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


def fail(msg):
    print("FAIL", msg)
    sys.exit(1)


def get(base, path, **params):
    url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def h(b):
    return hashlib.sha256(b).digest()


def node(l, r):
    return h(b"\x01" + l + r)


def u24(b):
    return struct.pack(">I", len(b))[1:] + b


def verify_inclusion(leaf, index, size, path, root):
    """RFC 9162 section 2.1.3.2."""
    if index >= size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(first, second, first_hash, second_hash, path):
    """RFC 9162 section 2.1.4.2."""
    if first == second:
        return not path and first_hash == second_hash
    if first == 0:
        return not path
    if not path:
        return False
    if first & (first - 1) == 0:
        path = [first_hash] + path
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node(c, fr)
            sr = node(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first_hash and sr == second_hash


def main():
    key_pem, base, sth_file, certs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    key_der_text = open(key_pem, "rb").read()
    key = serialization.load_pem_public_key(key_der_text)
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    log_id = h(spki)

    sth = get(base, "/ct/v1/get-sth")
    size, ts = sth["tree_size"], sth["timestamp"]
    root = base64.b64decode(sth["sha256_root_hash"])
    sig = base64.b64decode(sth["tree_head_signature"])
    if sig[0] != 4 or sig[1] != 3:
        fail("tree head signature is not SHA-256/ECDSA")
    (n,) = struct.unpack(">H", sig[2:4])
    signed = struct.pack(">BBQQ", 0, 1, ts, size) + root
    key.verify(sig[4 : 4 + n], signed, ec.ECDSA(hashes.SHA256()))
    print("sth signature ok, tree size", size)

    try:
        old = json.load(open(sth_file))
    except FileNotFoundError:
        old = None
    if old is not None:
        proof = get(
            base, "/ct/v1/get-sth-consistency", first=old["tree_size"], second=size
        )["consistency"]
        proof = [base64.b64decode(p) for p in proof]
        if not verify_consistency(
            old["tree_size"], size, base64.b64decode(old["sha256_root_hash"]), root, proof
        ):
            fail("tree heads %d and %d are not consistent" % (old["tree_size"], size))
        print("consistency ok", old["tree_size"], "->", size)
    json.dump(sth, open(sth_file, "w"))

    for path in certs:
        if path.endswith(".jwt"):
            check_jwt(key, log_id, base, size, root, path)
            continue
        chain = x509.load_pem_x509_certificates(open(path, "rb").read())
        cert, issuer = chain[0], chain[1]
        scts = cert.extensions.get_extension_for_class(
            x509.PrecertificateSignedCertificateTimestamps
        ).value
        if len(scts) != 1:
            fail("%s: %d SCTs" % (path, len(scts)))
        sct = scts[0]
        if sct.log_id != log_id:
            fail("%s: SCT from another log" % path)
        if sct.entry_type != x509.certificate_transparency.LogEntryType.PRE_CERTIFICATE:
            fail("%s: SCT is not for a precertificate" % path)
        ts_ms = round(sct.timestamp.replace(tzinfo=datetime.timezone.utc).timestamp() * 1000)
        ikh = h(
            issuer.public_key().public_bytes(
                serialization.Encoding.DER,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            )
        )
        tbs = cert.tbs_precertificate_bytes
        body = struct.pack(">Q", ts_ms) + struct.pack(">H", 1) + ikh + u24(tbs) + b"\x00\x00"
        signed = struct.pack(">BB", 0, 0) + body
        key.verify(sct.signature, signed, ec.ECDSA(hashes.SHA256()))
        leaf = h(b"\x00" + struct.pack(">BB", 0, 0) + body)
        r = get(
            base,
            "/ct/v1/get-proof-by-hash",
            hash=base64.b64encode(leaf).decode(),
            tree_size=size,
        )
        audit = [base64.b64decode(p) for p in r["audit_path"]]
        if not verify_inclusion(leaf, r["leaf_index"], size, audit, root):
            fail("%s: inclusion proof does not verify" % path)
        print("sct ok, included at", r["leaf_index"], path)



def b64u(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def check_jwt(key, log_id, base, size, root, path):
    header, payload, _sig = open(path).read().strip().split(".")
    claims = b64u(payload).decode()
    if "kame_scts" not in json.loads(claims):
        fail("%s: no kame_scts claim" % path)
    marker = ',"kame_scts":"'
    at = claims.rfind(marker)
    if at < 0 or not claims.endswith('"}'):
        fail("%s: kame_scts is not the last claim" % path)
    scts = base64.b64decode(claims[at + len(marker) : -2])
    logged = claims[:at] + "}"
    body = (header + "." + base64.urlsafe_b64encode(logged.encode()).decode().rstrip("=")).encode()
    # SignedCertificateTimestampList: u16 length, then u16-prefixed SCTs.
    (total,) = struct.unpack(">H", scts[:2])
    if total != len(scts) - 2:
        fail("%s: bad SCT list length" % path)
    (n,) = struct.unpack(">H", scts[2:4])
    sct = scts[4 : 4 + n]
    if len(scts) != 4 + n:
        fail("%s: expected one SCT" % path)
    if sct[0] != 0 or sct[1:33] != log_id:
        fail("%s: SCT is not a v1 SCT of this log" % path)
    (ts_ms,) = struct.unpack(">Q", sct[33:41])
    (ext_len,) = struct.unpack(">H", sct[41:43])
    rest = sct[43 + ext_len :]
    if rest[0] != 4 or rest[1] != 3:
        fail("%s: SCT signature is not SHA-256/ECDSA" % path)
    (sig_len,) = struct.unpack(">H", rest[2:4])
    signature = rest[4 : 4 + sig_len]
    entry = struct.pack(">Q", ts_ms) + struct.pack(">H", 0x8001) + u24(body) + b"\x00\x00"
    key.verify(signature, struct.pack(">BB", 0, 0) + entry, ec.ECDSA(hashes.SHA256()))
    leaf = h(b"\x00" + struct.pack(">BB", 0, 0) + entry)
    r = get(
        base,
        "/ct/v1/get-proof-by-hash",
        hash=base64.b64encode(leaf).decode(),
        tree_size=size,
    )
    audit = [base64.b64decode(p) for p in r["audit_path"]]
    if not verify_inclusion(leaf, r["leaf_index"], size, audit, root):
        fail("%s: inclusion proof does not verify" % path)
    print("jwt sct ok, included at", r["leaf_index"], path)


main()
