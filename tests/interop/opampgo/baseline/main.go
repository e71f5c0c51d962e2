// Command opampgo-baseline is the baseline of the fleet benchmark (benches/vs-opampgo.sh): a
// minimal server on opamp-go's server library (the version pinned in ../go.mod) that accepts
// every agent and answers every AgentToServer with a ServerToAgent naming the agent, and does
// nothing else (no store, no UI). It listens on --listen (loopback) at /v1/opamp, WebSocket
// and plain HTTP, until SIGTERM or SIGINT.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/open-telemetry/opamp-go/protobufs"
	"github.com/open-telemetry/opamp-go/server"
	"github.com/open-telemetry/opamp-go/server/types"
)

type quiet struct{}

func (quiet) Debugf(_ context.Context, _ string, _ ...any) {}
func (quiet) Errorf(_ context.Context, _ string, _ ...any) {}

func main() {
	listen := flag.String("listen", "127.0.0.1:4320", "listen address (keep it on loopback)")
	flag.Parse()
	callbacks := types.ConnectionCallbacks{
		OnMessage: func(_ context.Context, _ types.Connection, msg *protobufs.AgentToServer) *protobufs.ServerToAgent {
			return &protobufs.ServerToAgent{InstanceUid: msg.InstanceUid}
		},
	}
	s := server.New(quiet{})
	err := s.Start(server.StartSettings{
		Settings: server.Settings{Callbacks: types.Callbacks{
			OnConnecting: func(_ *http.Request) types.ConnectionResponse {
				return types.ConnectionResponse{Accept: true, ConnectionCallbacks: callbacks}
			},
		}},
		ListenEndpoint: *listen,
		ListenPath:     "/v1/opamp",
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "opampgo-baseline:", err)
		os.Exit(1)
	}
	fmt.Println("listening on", s.Addr().String())
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = s.Stop(ctx)
}
