// Command rcptguard is a Postfix policy service that catches compromised
// mail accounts by the nonexistent recipients they mail, and the tools to
// run it: see `rcptguard help` and the README.
package main

import (
	"os"

	"github.com/rcptguard/rcptguard/cmd/rcptguard/app"
)

func main() {
	os.Exit(app.Main(os.Args[1:], os.Stdout, os.Stderr))
}
