package blocklist_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/rcptguard/rcptguard/blocklist"
)

func Example() {
	dir, err := os.MkdirTemp("", "rcptguard")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "blocklist")

	list, problems, err := blocklist.Open(blocklist.Config{Path: path})
	if err != nil {
		panic(err)
	}
	fmt.Println("entries:", list.Len(), "problems:", len(problems))

	// The daemon blocks an identity...
	err = list.Add(context.Background(), blocklist.Entry{
		Identity: "Bob@Example.com",
		Action:   "HOLD",
		Text:     "rcptguard: 101 invalid recipients in 1h",
	})
	if err != nil {
		fmt.Println("not written yet, but in effect:", err)
	}

	// ...and answers every policy request from memory.
	if e, ok := list.Lookup("bob@example.com"); ok {
		fmt.Println(e.Action, e.Text)
	}

	data, _ := os.ReadFile(path)
	fmt.Print(string(data))
	// Output:
	// entries: 0 problems: 0
	// HOLD rcptguard: 101 invalid recipients in 1h
	// # rcptguard blocklist: IDENTITY<TAB>ACTION TEXT; Postfix access(5) table, see `rcptguard list`
	// bob@example.com	HOLD rcptguard: 101 invalid recipients in 1h
}
