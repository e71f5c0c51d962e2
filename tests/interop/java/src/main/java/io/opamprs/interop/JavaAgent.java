package io.opamprs.interop;

import io.opentelemetry.opamp.client.OpampClient;
import io.opentelemetry.opamp.client.internal.connectivity.http.OkHttpSender;
import io.opentelemetry.opamp.client.internal.connectivity.websocket.OkHttpWebSocket;
import io.opentelemetry.opamp.client.internal.request.delay.PeriodicDelay;
import io.opentelemetry.opamp.client.internal.request.service.HttpRequestService;
import io.opentelemetry.opamp.client.internal.request.service.WebSocketRequestService;
import io.opentelemetry.opamp.client.internal.response.MessageData;
import io.opentelemetry.opamp.client.internal.state.State;
import io.opentelemetry.opamp.client.request.service.RequestService;
import io.opentelemetry.opamp.client.OpampClientBuilder;
import java.time.Duration;
import java.util.Collections;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import okio.ByteString;
import opamp.proto.AgentConfigFile;
import opamp.proto.AgentConfigMap;
import opamp.proto.AgentRemoteConfig;
import opamp.proto.RemoteConfigStatus;
import opamp.proto.RemoteConfigStatuses;
import opamp.proto.ServerErrorResponse;

/**
 * One OpenTelemetry Java contrib OpAMP client against an OpAMP server, for the interop tests.
 * The transport follows the URL scheme (ws:// or http://). It reports a description and its
 * effective config; a remote config is applied (APPLIED, and it becomes the effective config)
 * unless it contains the word INVALID (FAILED with a message). Events are printed on stdout as
 * one JSON line each, which tests/interop/peers.py reads. Runs until SIGTERM.
 *
 * <p>Usage: JavaAgent ENDPOINT NAME INTERVAL_SECONDS
 */
public final class JavaAgent {
  private static final Object OUT = new Object();

  private JavaAgent() {}

  static String json(String s) {
    StringBuilder b = new StringBuilder("\"");
    for (char c : s.toCharArray()) {
      if (c == '"' || c == '\\') {
        b.append('\\').append(c);
      } else if (c < 0x20) {
        b.append(String.format("\\u%04x", (int) c));
      } else {
        b.append(c);
      }
    }
    return b.append('"').toString();
  }

  static void emit(String event, Map<String, String> fields) {
    StringBuilder b = new StringBuilder("{\"event\":").append(json(event));
    b.append(",\"t_unix_ms\":").append(System.currentTimeMillis());
    for (Map.Entry<String, String> e : fields.entrySet()) {
      b.append(',').append(json(e.getKey())).append(':').append(json(e.getValue()));
    }
    synchronized (OUT) {
      System.out.println(b.append('}'));
      System.out.flush();
    }
  }

  /** The effective config the client reports: the last applied remote config. */
  static final class Effective extends State.EffectiveConfig {
    private volatile opamp.proto.EffectiveConfig current =
        new opamp.proto.EffectiveConfig.Builder()
            .config_map(new AgentConfigMap.Builder().config_map(Collections.emptyMap()).build())
            .build();

    @Override
    public opamp.proto.EffectiveConfig get() {
      return current;
    }

    void set(AgentConfigMap map) {
      current = new opamp.proto.EffectiveConfig.Builder().config_map(map).build();
      notifyUpdate();
    }
  }

  public static void main(String[] args) throws Exception {
    if (args.length != 3) {
      System.err.println("usage: JavaAgent ENDPOINT NAME INTERVAL_SECONDS");
      System.exit(2);
    }
    String endpoint = args[0];
    String name = args[1];
    PeriodicDelay interval = PeriodicDelay.ofFixedDuration(Duration.ofSeconds(Long.parseLong(args[2])));
    boolean ws = endpoint.startsWith("ws");
    RequestService service =
        ws
            ? WebSocketRequestService.create(OkHttpWebSocket.create(endpoint), interval)
            : HttpRequestService.create(
                OkHttpSender.create(endpoint), interval, HttpRequestService.DEFAULT_DELAY_BETWEEN_RETRIES);
    Effective effective = new Effective();
    byte[] uid = OpampClientBuilder.createRandomInstanceUid();
    final ByteString[] lastHash = {null};

    OpampClient.Callbacks callbacks =
        new OpampClient.Callbacks() {
          @Override
          public void onConnect(OpampClient client) {
            emit("connected", Map.of());
          }

          @Override
          public void onConnectFailed(OpampClient client, Throwable t) {
            emit("connect_failed", Map.of("message", String.valueOf(t)));
          }

          @Override
          public void onErrorResponse(OpampClient client, ServerErrorResponse e) {
            emit("server_error", Map.of("message", String.valueOf(e)));
          }

          @Override
          public void onMessage(OpampClient client, MessageData data) {
            AgentRemoteConfig rc = data.getRemoteConfig();
            if (rc == null || rc.config_hash.equals(lastHash[0])) {
              return;
            }
            lastHash[0] = rc.config_hash;
            boolean invalid = false;
            if (rc.config != null) {
              for (AgentConfigFile f : rc.config.config_map.values()) {
                if (f.body.utf8().contains("INVALID")) {
                  invalid = true;
                }
              }
            }
            RemoteConfigStatus.Builder st =
                new RemoteConfigStatus.Builder().last_remote_config_hash(rc.config_hash);
            if (invalid) {
              st.status(RemoteConfigStatuses.RemoteConfigStatuses_FAILED)
                  .error_message("java client rejected the config: it contains INVALID");
            } else {
              st.status(RemoteConfigStatuses.RemoteConfigStatuses_APPLIED);
              effective.set(rc.config);
            }
            RemoteConfigStatus status = st.build();
            client.setRemoteConfigStatus(status);
            Map<String, String> f = new LinkedHashMap<>();
            f.put("hash", HexFormat.of().formatHex(rc.config_hash.toByteArray()));
            f.put("status", status.status.name());
            emit("remote_config", f);
          }
        };

    OpampClient client =
        OpampClient.builder()
            .setRequestService(service)
            .setInstanceUid(uid)
            .putIdentifyingAttribute("service.name", name)
            .putIdentifyingAttribute("service.version", "java-contrib-1.53.0-alpha")
            .putNonIdentifyingAttribute("host.name", java.net.InetAddress.getLocalHost().getHostName())
            .putNonIdentifyingAttribute("os.type", System.getProperty("os.name").toLowerCase())
            .enableRemoteConfig()
            .enableEffectiveConfigReporting()
            .setEffectiveConfigState(effective)
            .build(callbacks);
    emit(
        "started",
        Map.of("uid", HexFormat.of().formatHex(uid), "transport", ws ? "websocket" : "http"));

    CountDownLatch stop = new CountDownLatch(1);
    Runtime.getRuntime()
        .addShutdownHook(
            new Thread(
                () -> {
                  try {
                    client.close();
                  } catch (Exception e) {
                    emit("error", Map.of("message", "close: " + e));
                  }
                  emit("stopped", Map.of());
                  stop.countDown();
                }));
    stop.await();
  }
}
