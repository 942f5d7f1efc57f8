// spire_devid_json decodes one tpm_devid message with Go's encoding/json into the struct
// shapes SPIRE's tpm_devid plugin uses (Go field names, no json tags: tpm_devid.md §1.2, §1.5,
// §1.6), encodes it again, and writes the result: what a Go peer reads from Kame and what it
// would send back. Standard library only. Usage: spire_devid_json KIND < in.json > out.json,
// KIND one of AttestationRequest, ChallengeRequest, ChallengeResponse. It must not hold any
// logic of Kame's: it is the Go side of the interoperability test.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
)

type AttestationRequest struct {
	DevIDCert              [][]byte
	DevIDPub               []byte
	EKCert                 []byte
	EKPub                  []byte
	AKPub                  []byte
	CertifiedDevID         []byte
	CertificationSignature []byte
}

type CredActivation struct {
	Credential []byte
	Secret     []byte
}

type ChallengeRequest struct {
	DevID          []byte
	CredActivation *CredActivation
}

type ChallengeResponse struct {
	DevID          []byte
	CredActivation []byte
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: spire_devid_json AttestationRequest|ChallengeRequest|ChallengeResponse")
		os.Exit(2)
	}
	in, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	var v interface{}
	switch os.Args[1] {
	case "AttestationRequest":
		v = &AttestationRequest{}
	case "ChallengeRequest":
		v = &ChallengeRequest{}
	case "ChallengeResponse":
		v = &ChallengeResponse{}
	default:
		fmt.Fprintln(os.Stderr, "unknown kind", os.Args[1])
		os.Exit(2)
	}
	if err := json.Unmarshal(in, v); err != nil {
		fmt.Fprintln(os.Stderr, "unmarshal:", err)
		os.Exit(1)
	}
	out, err := json.Marshal(v)
	if err != nil {
		fmt.Fprintln(os.Stderr, "marshal:", err)
		os.Exit(1)
	}
	os.Stdout.Write(out)
}
