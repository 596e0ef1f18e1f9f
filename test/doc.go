// Package test holds rcptguard's end-to-end tests and the in-process servers
// they use: a DNS server, SMTP servers and a policy client. Product code never
// imports it.
//
// Every helper takes a testing.TB, listens on 127.0.0.1 only, and shuts itself
// down through t.Cleanup, so a test needs no teardown code of its own.
package test
