package queue

import (
	"fmt"
	"strings"
)

// MaxIDLen is the longest queue ID accepted.
const MaxIDLen = 32

// ValidID reports whether id has the form of a Postfix queue ID: the short
// form (upper-case hexadecimal, at least 6 digits) or the long form
// (enable_long_queue_ids: the time in seconds and microseconds in base 52,
// at least 10 digits, the separator 'z', the inode number in base 51,
// whose alphabet lacks 'z'). Neither form can start with '-', so a valid
// ID is never taken for an option.
func ValidID(id string) bool {
	if len(id) < 6 || len(id) > MaxIDLen {
		return false
	}
	if shortID(id) {
		return true
	}
	for i := 0; i < len(id); i++ {
		if !safeChar(id[i]) {
			return false
		}
	}
	sep := strings.LastIndexByte(id, 'z')
	return sep >= 10 && sep < len(id)-1
}

func shortID(id string) bool {
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !('0' <= c && c <= '9' || 'A' <= c && c <= 'F') {
			return false
		}
	}
	return true
}

// safeChar reports whether c is in Postfix's base-52 "safe" alphabet:
// the digits and the consonants of both cases.
func safeChar(c byte) bool {
	switch {
	case '0' <= c && c <= '9':
		return true
	case 'A' <= c && c <= 'Z':
		c += 'a' - 'A'
	case 'a' <= c && c <= 'z':
	default:
		return false
	}
	switch c {
	case 'a', 'e', 'i', 'o', 'u':
		return false
	}
	return true
}

// checkIDs returns an error naming the first invalid ID.
func checkIDs(ids []string) error {
	for _, id := range ids {
		if !ValidID(id) {
			return fmt.Errorf("queue: %q is not a Postfix queue ID", printable(id, 40))
		}
	}
	return nil
}
