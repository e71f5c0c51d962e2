// Command opampgo-client runs one opamp-go client (the library pinned in ../go.mod) against an
// OpAMP server, for the interop tests. The transport follows the URL scheme (ws:// or
// http://). It reports a description, health and its effective config; a remote config is
// applied (APPLIED, and it becomes the effective config) unless it contains the word INVALID
// (FAILED with a message). After its first connection it announces a custom capability and
// sends one custom message. Every event is printed on stdout as one JSON line, which
// tests/interop/peers.py reads. It runs until SIGTERM or SIGINT.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/open-telemetry/opamp-go/client"
	"github.com/open-telemetry/opamp-go/client/types"
	"github.com/open-telemetry/opamp-go/protobufs"
)

// customCapability is the custom capability this driver announces and messages under.
const customCapability = "io.opamp-rs.interop"

// initialConfig is the effective config reported until a remote config is applied.
const initialConfig = "# opamp-go interop client: no remote config applied yet\n"

var out = json.NewEncoder(os.Stdout)
var outMu sync.Mutex

func emit(event string, fields map[string]any) {
	if fields == nil {
		fields = map[string]any{}
	}
	fields["event"] = event
	fields["t_unix_ms"] = time.Now().UnixMilli()
	outMu.Lock()
	defer outMu.Unlock()
	_ = out.Encode(fields)
}

type logger struct{}

func (logger) Debugf(_ context.Context, format string, v ...any) {}
func (logger) Errorf(_ context.Context, format string, v ...any) {
	emit("library_error", map[string]any{"message": fmt.Sprintf(format, v...)})
}

func str(k, v string) *protobufs.KeyValue {
	return &protobufs.KeyValue{Key: k, Value: &protobufs.AnyValue{Value: &protobufs.AnyValue_StringValue{StringValue: v}}}
}

type agent struct {
	client    client.OpAMPClient
	mu        sync.Mutex
	effective *protobufs.AgentConfigMap
	lastHash  []byte
	started   uint64
	customMu  sync.Once
}

func (a *agent) effectiveConfig(context.Context) (*protobufs.EffectiveConfig, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return &protobufs.EffectiveConfig{ConfigMap: a.effective}, nil
}

func (a *agent) onMessage(ctx context.Context, msg *types.MessageData) {
	if msg.CustomMessage != nil {
		emit("custom_message", map[string]any{"capability": msg.CustomMessage.Capability,
			"type": msg.CustomMessage.Type, "data": string(msg.CustomMessage.Data)})
	}
	if msg.AgentIdentification != nil {
		emit("new_instance_uid", map[string]any{"uid": hex.EncodeToString(msg.AgentIdentification.NewInstanceUid)})
	}
	rc := msg.RemoteConfig
	if rc == nil {
		return
	}
	a.mu.Lock()
	same := bytes.Equal(a.lastHash, rc.ConfigHash)
	a.lastHash = rc.ConfigHash
	a.mu.Unlock()
	if same {
		return
	}
	status := &protobufs.RemoteConfigStatus{LastRemoteConfigHash: rc.ConfigHash}
	invalid := false
	for _, f := range rc.GetConfig().GetConfigMap() {
		if bytes.Contains(f.Body, []byte("INVALID")) {
			invalid = true
		}
	}
	if invalid {
		status.Status = protobufs.RemoteConfigStatuses_RemoteConfigStatuses_FAILED
		status.ErrorMessage = "opamp-go client rejected the config: it contains INVALID"
	} else {
		status.Status = protobufs.RemoteConfigStatuses_RemoteConfigStatuses_APPLIED
		a.mu.Lock()
		a.effective = rc.GetConfig()
		a.mu.Unlock()
	}
	if err := a.client.SetRemoteConfigStatus(status); err != nil {
		emit("error", map[string]any{"message": "SetRemoteConfigStatus: " + err.Error()})
	}
	if !invalid {
		if err := a.client.UpdateEffectiveConfig(ctx); err != nil {
			emit("error", map[string]any{"message": "UpdateEffectiveConfig: " + err.Error()})
		}
	}
	emit("remote_config", map[string]any{"hash": hex.EncodeToString(rc.ConfigHash), "status": status.Status.String()})
}

func (a *agent) sendCustom() {
	caps := &protobufs.CustomCapabilities{Capabilities: []string{customCapability}}
	if err := a.client.SetCustomCapabilities(caps); err != nil {
		emit("error", map[string]any{"message": "SetCustomCapabilities: " + err.Error()})
		return
	}
	sent, err := a.client.SendCustomMessage(&protobufs.CustomMessage{
		Capability: customCapability, Type: "ping", Data: []byte("hello from opamp-go"),
	})
	if err != nil {
		emit("error", map[string]any{"message": "SendCustomMessage: " + err.Error()})
		return
	}
	select {
	case <-sent:
		emit("custom_message_sent", map[string]any{"capability": customCapability})
	case <-time.After(30 * time.Second):
		emit("error", map[string]any{"message": "custom message not sent within 30 s"})
	}
}

func main() {
	endpoint := flag.String("endpoint", "", "OpAMP server URL, ws:// or http://")
	name := flag.String("name", "opampgo-agent", "service.name")
	heartbeat := flag.Duration("heartbeat", 30*time.Second, "heartbeat (WebSocket) or polling (HTTP) interval")
	compress := flag.Bool("compress", false, "EnableCompression: permessage-deflate (WebSocket) or gzip request bodies (HTTP)")
	flag.Parse()
	if *endpoint == "" {
		fmt.Fprintln(os.Stderr, "usage: opampgo-client --endpoint ws://HOST:PORT/v1/opamp [--name N] [--heartbeat 30s]")
		os.Exit(2)
	}

	a := &agent{started: uint64(time.Now().UnixNano()), effective: &protobufs.AgentConfigMap{
		ConfigMap: map[string]*protobufs.AgentConfigFile{
			"": {Body: []byte(initialConfig), ContentType: "text/yaml"},
		},
	}}
	transport := "http"
	if strings.HasPrefix(*endpoint, "ws") {
		a.client = client.NewWebSocket(logger{})
		transport = "websocket"
	} else {
		a.client = client.NewHTTP(logger{})
	}
	host, _ := os.Hostname()
	if err := a.client.SetAgentDescription(&protobufs.AgentDescription{
		IdentifyingAttributes:    []*protobufs.KeyValue{str("service.name", *name), str("service.version", "opamp-go-v0.23.0")},
		NonIdentifyingAttributes: []*protobufs.KeyValue{str("host.name", host), str("os.type", runtime.GOOS)},
	}); err != nil {
		emit("fatal", map[string]any{"message": err.Error()})
		os.Exit(1)
	}
	if err := a.client.SetHealth(&protobufs.ComponentHealth{
		Healthy: true, Status: "running", StartTimeUnixNano: a.started,
		ComponentHealthMap: map[string]*protobufs.ComponentHealth{
			"pipeline:interop": {Healthy: true, Status: "ok", StartTimeUnixNano: a.started},
		},
	}); err != nil {
		emit("fatal", map[string]any{"message": err.Error()})
		os.Exit(1)
	}

	caps := protobufs.AgentCapabilities_AgentCapabilities_ReportsStatus |
		protobufs.AgentCapabilities_AgentCapabilities_AcceptsRemoteConfig |
		protobufs.AgentCapabilities_AgentCapabilities_ReportsEffectiveConfig |
		protobufs.AgentCapabilities_AgentCapabilities_ReportsRemoteConfig |
		protobufs.AgentCapabilities_AgentCapabilities_ReportsHealth |
		protobufs.AgentCapabilities_AgentCapabilities_ReportsHeartbeat
	if err := a.client.SetCapabilities(&caps); err != nil {
		emit("fatal", map[string]any{"message": err.Error()})
		os.Exit(1)
	}

	var uid types.InstanceUid
	_, _ = rand.Read(uid[:])
	uid[6] = (uid[6] & 0x0f) | 0x40 // a version-4 UUID
	uid[8] = (uid[8] & 0x3f) | 0x80
	interval := *heartbeat
	settings := types.StartSettings{
		OpAMPServerURL:    *endpoint,
		InstanceUid:       uid,
		HeartbeatInterval: &interval,
		EnableCompression: *compress,
		Callbacks: types.Callbacks{
			OnConnect: func(context.Context) {
				emit("connected", nil)
				go a.customMu.Do(a.sendCustom)
			},
			OnConnectFailed: func(_ context.Context, err error) {
				emit("connect_failed", map[string]any{"message": err.Error()})
			},
			OnError: func(_ context.Context, e *protobufs.ServerErrorResponse) {
				emit("server_error", map[string]any{"type": e.Type.String(), "message": e.ErrorMessage})
			},
			OnMessage:          a.onMessage,
			GetEffectiveConfig: a.effectiveConfig,
			OnCommand: func(_ context.Context, c *protobufs.ServerToAgentCommand) error {
				emit("command", map[string]any{"type": c.Type.String()})
				return nil
			},
		},
	}
	if hc, ok := a.client.(interface{ SetPollingInterval(time.Duration) }); ok {
		hc.SetPollingInterval(interval)
	}
	if err := a.client.Start(context.Background(), settings); err != nil {
		emit("fatal", map[string]any{"message": "Start: " + err.Error()})
		os.Exit(1)
	}
	emit("started", map[string]any{"uid": hex.EncodeToString(uid[:]), "transport": transport})

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := a.client.Stop(ctx); err != nil {
		emit("error", map[string]any{"message": "Stop: " + err.Error()})
	}
	emit("stopped", nil)
}
