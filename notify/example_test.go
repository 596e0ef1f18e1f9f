package notify_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net/mail"
	"os"
	"time"

	"github.com/rcptguard/rcptguard/notify"
)

func ExampleCompose() {
	r := notify.SampleReport(time.Date(2024, 3, 5, 14, 3, 7, 0, time.UTC), "mail1.example.net")
	raw, err := notify.Compose(r, "rcptguard@mail1.example.net", []string{"abuse@example.net"})
	if err != nil {
		fmt.Println(err)
		return
	}
	msg, _ := mail.ReadMessage(bytes.NewReader(raw))
	fmt.Println(msg.Header.Get("Subject"))
	fmt.Println(msg.Header.Get("Auto-Submitted"))
	// Output:
	// [rcptguard] blocked sample.user@example.com: 101 invalid recipients in 1h
	// auto-generated
}

// The wiring runs the sender loop in a goroutine it owns and hands each
// block event to Enqueue, which returns as soon as the report is spooled.
func ExampleMailer() {
	m, err := notify.New(notify.Config{
		To:       []string{"abuse@example.net"},
		From:     "rcptguard@mail1.example.net",
		Relay:    "127.0.0.1:25",
		StartTLS: notify.StartTLSOpportunistic,
		Spool:    "/var/lib/rcptguard/spool",
		Logger:   slog.New(slog.NewTextHandler(os.Stderr, nil)),
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()

	r := notify.SampleReport(time.Now(), "")
	if err := m.Enqueue(ctx, r); err != nil {
		fmt.Println(err)
	}

	stop() // at shutdown
	<-done
}
