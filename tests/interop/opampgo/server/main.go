// Command opampgo-server runs an opamp-go server (the library pinned in ../go.mod) on a
// loopback address, for the interop tests: our reference agent connects to it over WebSocket
// or plain HTTP. It prints every AgentToServer it receives as one JSON line on stdout
// (tests/interop/peers.py reads them) and offers each agent that accepts remote config first
// the --good config, then, once the agent reports it APPLIED, the --bad config (which the
// reference agent must report FAILED), and then sets ReportFullState once. Over WebSocket the
// second offer is pushed by the server on its own (Connection.Send), not as a reply. It runs
// until SIGTERM or SIGINT.
package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/open-telemetry/opamp-go/protobufs"
	"github.com/open-telemetry/opamp-go/server"
	"github.com/open-telemetry/opamp-go/server/types"
)

var out = json.NewEncoder(os.Stdout)
var outMu sync.Mutex

func emit(event string, fields map[string]any) {
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

func remoteConfig(body []byte) *protobufs.AgentRemoteConfig {
	m := &protobufs.AgentConfigMap{ConfigMap: map[string]*protobufs.AgentConfigFile{
		"": {Body: body, ContentType: "text/yaml"},
	}}
	h := sha256.Sum256(body)
	return &protobufs.AgentRemoteConfig{Config: m, ConfigHash: h[:]}
}

func anyString(v *protobufs.AnyValue) any {
	switch x := v.GetValue().(type) {
	case *protobufs.AnyValue_StringValue:
		return x.StringValue
	case *protobufs.AnyValue_IntValue:
		return x.IntValue
	case *protobufs.AnyValue_BoolValue:
		return x.BoolValue
	case *protobufs.AnyValue_DoubleValue:
		return x.DoubleValue
	}
	return fmt.Sprint(v)
}

func attrs(kvs []*protobufs.KeyValue) map[string]any {
	m := map[string]any{}
	for _, kv := range kvs {
		m[kv.Key] = anyString(kv.Value)
	}
	return m
}

func health(h *protobufs.ComponentHealth) map[string]any {
	if h == nil {
		return nil
	}
	comps := map[string]any{}
	for k, c := range h.ComponentHealthMap {
		comps[k] = health(c)
	}
	return map[string]any{"healthy": h.Healthy, "status": h.Status, "last_error": h.LastError,
		"start_time_unix_nano": h.StartTimeUnixNano, "components": comps}
}

// agentState is what the server tracks per instance uid.
type agentState struct {
	stage     int  // 0: offer good, 1: offer bad, 2: done
	askedFull bool // ReportFullState sent (once, after stage 2)
}

// askFullState reports whether to set ReportFullState now: once, when uid has finished both
// configs, so that the harness can check the agent then sends its full state (SEQ-3).
func (s *srv) askFullState(uid string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.agents[uid]
	if st == nil || st.stage != 2 || st.askedFull {
		return false
	}
	st.askedFull = true
	return true
}

type srv struct {
	good, bad *protobufs.AgentRemoteConfig
	mu        sync.Mutex
	agents    map[string]*agentState
}

// offer returns the config to offer uid after msg, advancing its stage on the reported status.
func (s *srv) offer(uid string, msg *protobufs.AgentToServer) (*protobufs.AgentRemoteConfig, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.agents[uid]
	if st == nil {
		st = &agentState{}
		s.agents[uid] = st
	}
	if msg.Capabilities&uint64(protobufs.AgentCapabilities_AgentCapabilities_AcceptsRemoteConfig) == 0 {
		return nil, false
	}
	advanced := false
	if rcs := msg.RemoteConfigStatus; rcs != nil {
		if st.stage == 0 && bytes.Equal(rcs.LastRemoteConfigHash, s.good.ConfigHash) &&
			rcs.Status == protobufs.RemoteConfigStatuses_RemoteConfigStatuses_APPLIED {
			st.stage, advanced = 1, true
		} else if st.stage == 1 && bytes.Equal(rcs.LastRemoteConfigHash, s.bad.ConfigHash) &&
			rcs.Status == protobufs.RemoteConfigStatuses_RemoteConfigStatuses_FAILED {
			st.stage, advanced = 2, true
		}
	}
	reported := msg.GetRemoteConfigStatus().GetLastRemoteConfigHash()
	switch st.stage {
	case 0:
		return s.good, advanced
	case 1:
		if bytes.Equal(reported, s.bad.ConfigHash) {
			return nil, advanced
		}
		return s.bad, advanced
	}
	return nil, advanced
}

func main() {
	listen := flag.String("listen", "127.0.0.1:4320", "listen address (keep it on loopback)")
	goodFile := flag.String("good", "", "file with the config to offer first")
	badFile := flag.String("bad", "", "file with the config to offer once the first is APPLIED")
	compress := flag.Bool("compress", false, "EnableCompression: gzip responses (HTTP), permessage-deflate (WebSocket)")
	flag.Parse()
	good, err1 := os.ReadFile(*goodFile)
	bad, err2 := os.ReadFile(*badFile)
	if err1 != nil || err2 != nil {
		fmt.Fprintln(os.Stderr, "usage: opampgo-server --listen 127.0.0.1:PORT --good FILE --bad FILE")
		os.Exit(2)
	}
	s := &srv{good: remoteConfig(good), bad: remoteConfig(bad), agents: map[string]*agentState{}}
	emit("configs", map[string]any{"good_hash": hex.EncodeToString(s.good.ConfigHash),
		"bad_hash": hex.EncodeToString(s.bad.ConfigHash)})

	callbacks := func(transport string) types.ConnectionCallbacks {
		return types.ConnectionCallbacks{
			OnConnected: func(_ context.Context, conn types.Connection) {
				emit("connected", map[string]any{"transport": transport})
			},
			OnMessage: func(ctx context.Context, conn types.Connection, msg *protobufs.AgentToServer) *protobufs.ServerToAgent {
				uid := hex.EncodeToString(msg.InstanceUid)
				rec := map[string]any{"uid": uid, "transport": transport, "seq": msg.SequenceNum, "capabilities": msg.Capabilities,
					"flags": msg.Flags, "disconnect": msg.AgentDisconnect != nil}
				if d := msg.AgentDescription; d != nil {
					rec["identifying"] = attrs(d.IdentifyingAttributes)
					rec["non_identifying"] = attrs(d.NonIdentifyingAttributes)
				}
				if msg.Health != nil {
					rec["health"] = health(msg.Health)
				}
				if rcs := msg.RemoteConfigStatus; rcs != nil {
					rec["remote_config_status"] = map[string]any{"status": rcs.Status.String(),
						"hash": hex.EncodeToString(rcs.LastRemoteConfigHash), "error_message": rcs.ErrorMessage}
				}
				if ec := msg.EffectiveConfig; ec != nil {
					files := map[string]any{}
					for k, f := range ec.GetConfigMap().GetConfigMap() {
						files[k] = map[string]any{"content_type": f.ContentType, "body": string(f.Body)}
					}
					rec["effective_config"] = files
				}
				emit("message", rec)

				resp := &protobufs.ServerToAgent{InstanceUid: msg.InstanceUid}
				cfg, advanced := s.offer(uid, msg)
				if s.askFullState(uid) {
					resp.Flags = uint64(protobufs.ServerToAgentFlags_ServerToAgentFlags_ReportFullState)
					emit("asked_full_state", map[string]any{"uid": uid, "after_seq": msg.SequenceNum})
				}
				if cfg == nil {
					return resp
				}
				// Over WebSocket, a new offer after a status change is pushed by the server on
				// its own; the reply carries nothing. Over HTTP it rides on the reply.
				if advanced && transport == "websocket" && cfg == s.bad {
					go func() {
						push := &protobufs.ServerToAgent{InstanceUid: msg.InstanceUid, RemoteConfig: cfg}
						err := conn.Send(context.Background(), push)
						emit("pushed", map[string]any{"uid": uid, "hash": hex.EncodeToString(cfg.ConfigHash), "error": fmt.Sprint(err)})
					}()
					return resp
				}
				resp.RemoteConfig = cfg
				emit("offered", map[string]any{"uid": uid, "hash": hex.EncodeToString(cfg.ConfigHash)})
				return resp
			},
			OnConnectionClose: func(conn types.Connection) {
				emit("closed", map[string]any{})
			},
			OnReadMessageError: func(_ types.Connection, mt int, b []byte, err error) {
				emit("read_error", map[string]any{"message": err.Error(), "type": mt, "len": len(b)})
			},
		}
	}
	opamp := server.New(logger{})
	err := opamp.Start(server.StartSettings{
		Settings: server.Settings{EnableCompression: *compress, Callbacks: types.Callbacks{
			OnConnecting: func(r *http.Request) types.ConnectionResponse {
				transport := "http"
				if r.Header.Get("Upgrade") != "" {
					transport = "websocket"
				}
				emit("connecting", map[string]any{"transport": transport, "user_agent": r.UserAgent(),
					"content_type":        r.Header.Get("Content-Type"),
					"instance_uid_header": r.Header.Get("OpAMP-Instance-UID"),
					"content_encoding":    r.Header.Get("Content-Encoding"),
					"accept_encoding":     r.Header.Get("Accept-Encoding")})
				return types.ConnectionResponse{Accept: true, ConnectionCallbacks: callbacks(transport)}
			},
		}},
		ListenEndpoint: *listen,
		ListenPath:     "/v1/opamp",
	})
	if err != nil {
		emit("fatal", map[string]any{"message": err.Error()})
		os.Exit(1)
	}
	emit("listening", map[string]any{"addr": opamp.Addr().String()})
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = opamp.Stop(ctx)
}
