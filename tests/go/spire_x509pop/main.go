// spire_x509pop is the Go side of the x509pop interoperability test: SPIRE's message structs
// and JSON tags, and the proof as SPIRE's agent makes it and its server checks it, written
// with Go's standard library only (crypto/rsa, crypto/ecdsa, crypto/sha256, encoding/json).
// It must not hold any logic of Kame's.
//
//	spire_x509pop payload CERT.pem [INTERMEDIATES.pem]   > AttestationData JSON
//	spire_x509pop respond KEY.pem < challenge.json      > Response JSON
//	spire_x509pop verify CERT.pem CHALLENGE.json < response.json   (exit 0 if it verifies)
package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"os"
)

type AttestationData struct {
	Certificates [][]byte `json:"certificates"`
}

type RSASignatureChallenge struct {
	Nonce []byte `json:"nonce"`
}

type ECDSASignatureChallenge struct {
	Nonce []byte `json:"nonce"`
}

type Challenge struct {
	RSASignature   *RSASignatureChallenge   `json:"rsa_signature"`
	ECDSASignature *ECDSASignatureChallenge `json:"ecdsa_signature"`
}

type RSASignatureResponse struct {
	Nonce     []byte `json:"nonce"`
	Signature []byte `json:"signature"`
}

type ECDSASignatureResponse struct {
	Nonce []byte `json:"nonce"`
	R     []byte `json:"r"`
	S     []byte `json:"s"`
}

type Response struct {
	RSASignature   *RSASignatureResponse   `json:"rsa_signature"`
	ECDSASignature *ECDSASignatureResponse `json:"ecdsa_signature"`
}

func combine(challenge, response []byte) ([]byte, error) {
	if len(challenge) != 32 {
		return nil, errors.New("invalid challenge nonce")
	}
	if len(response) != 32 {
		return nil, errors.New("invalid response nonce")
	}
	h := sha256.Sum256(append(append([]byte{}, challenge...), response...))
	return h[:], nil
}

func certs(path string) [][]byte {
	data, err := os.ReadFile(path)
	check(err)
	var out [][]byte
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			return out
		}
		if b.Type == "CERTIFICATE" {
			out = append(out, b.Bytes)
		}
	}
}

func key(path string) crypto.Signer {
	data, err := os.ReadFile(path)
	check(err)
	b, _ := pem.Decode(data)
	if b == nil {
		check(errors.New("no PEM key"))
	}
	if k, err := x509.ParsePKCS8PrivateKey(b.Bytes); err == nil {
		return k.(crypto.Signer)
	}
	if k, err := x509.ParsePKCS1PrivateKey(b.Bytes); err == nil {
		return k
	}
	k, err := x509.ParseECPrivateKey(b.Bytes)
	check(err)
	return k
}

func respond(k crypto.Signer, c *Challenge) *Response {
	nonce := make([]byte, 32)
	_, err := rand.Read(nonce)
	check(err)
	switch k := k.(type) {
	case *rsa.PrivateKey:
		if c.RSASignature == nil {
			check(errors.New("expecting RSA challenge"))
		}
		combined, err := combine(c.RSASignature.Nonce, nonce)
		check(err)
		sig, err := rsa.SignPSS(rand.Reader, k, crypto.SHA256, combined, nil)
		check(err)
		return &Response{RSASignature: &RSASignatureResponse{Nonce: nonce, Signature: sig}}
	case *ecdsa.PrivateKey:
		if c.ECDSASignature == nil {
			check(errors.New("expecting ECDSA challenge"))
		}
		combined, err := combine(c.ECDSASignature.Nonce, nonce)
		check(err)
		r, s, err := ecdsa.Sign(rand.Reader, k, combined)
		check(err)
		return &Response{ECDSASignature: &ECDSASignatureResponse{Nonce: nonce, R: r.Bytes(), S: s.Bytes()}}
	}
	check(fmt.Errorf("unsupported private key type %T", k))
	return nil
}

func verify(cert *x509.Certificate, c *Challenge, r *Response) error {
	switch pub := cert.PublicKey.(type) {
	case *rsa.PublicKey:
		if c.RSASignature == nil || r.RSASignature == nil {
			return errors.New("expecting RSA response")
		}
		combined, err := combine(c.RSASignature.Nonce, r.RSASignature.Nonce)
		if err != nil {
			return err
		}
		return rsa.VerifyPSS(pub, crypto.SHA256, combined, r.RSASignature.Signature, nil)
	case *ecdsa.PublicKey:
		if c.ECDSASignature == nil || r.ECDSASignature == nil {
			return errors.New("expecting ECDSA response")
		}
		combined, err := combine(c.ECDSASignature.Nonce, r.ECDSASignature.Nonce)
		if err != nil {
			return err
		}
		rr := new(big.Int).SetBytes(r.ECDSASignature.R)
		ss := new(big.Int).SetBytes(r.ECDSASignature.S)
		if !ecdsa.Verify(pub, combined, rr, ss) {
			return errors.New("ECDSA signature verify failed")
		}
		return nil
	}
	return fmt.Errorf("unsupported public key type %T", cert.PublicKey)
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func main() {
	if len(os.Args) < 3 {
		check(errors.New("usage: spire_x509pop payload|respond|verify ..."))
	}
	switch os.Args[1] {
	case "payload":
		var all [][]byte
		for _, p := range os.Args[2:] {
			all = append(all, certs(p)...)
		}
		out, err := json.Marshal(AttestationData{Certificates: all})
		check(err)
		os.Stdout.Write(out)
	case "respond":
		in, err := io.ReadAll(os.Stdin)
		check(err)
		c := new(Challenge)
		check(json.Unmarshal(in, c))
		out, err := json.Marshal(respond(key(os.Args[2]), c))
		check(err)
		os.Stdout.Write(out)
	case "verify":
		cert, err := x509.ParseCertificate(certs(os.Args[2])[0])
		check(err)
		cj, err := os.ReadFile(os.Args[3])
		check(err)
		c := new(Challenge)
		check(json.Unmarshal(cj, c))
		in, err := io.ReadAll(os.Stdin)
		check(err)
		r := new(Response)
		check(json.Unmarshal(in, r))
		check(verify(cert, c, r))
	default:
		check(errors.New("unknown command"))
	}
}
