{{/*
What every stage's pod shares: names, labels, the image, the model volume, the
security contexts, probes and the `ditmesh serve` arguments. The workload templates
(deployment-*.yaml, statefulset-denoiser.yaml, leaderworkerset-denoiser.yaml) put
these together; a stage's own keys come in as `.s` (its values block).
*/}}

{{- define "ditmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ditmesh.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object of a stage; the gateway's autoscaler scales only workloads
that carry part-of=ditmesh and its stage's label (gateway/autoscale_backends.py). */}}
{{- define "ditmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: ditmesh
{{ include "ditmesh.selectorLabels" . }}
{{- end -}}

{{- define "ditmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ditmesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
ditmesh.io/stage: {{ .stage }}
{{- end -}}

{{/* The denoiser group's workload name. */}}
{{- define "ditmesh.denoiserName" -}}
{{- printf "%s-denoiser-%s" (include "ditmesh.fullname" .root) .group.name -}}
{{- end -}}

{{/* GPUs of one denoiser gang: the product of its degrees (unset degrees are 1). */}}
{{- define "ditmesh.gangSize" -}}
{{- $p := .parallel | default dict -}}
{{- mul (default 1 $p.dp) (default 1 $p.cfg) (default 1 $p.pipefusion) (default 1 $p.ulysses) (default 1 $p.ring) -}}
{{- end -}}

{{/* The group the autoscaler (or KEDA) scales. */}}
{{- define "ditmesh.autoscaleGroup" -}}
{{- $want := .Values.denoiser.autoscaleGroup | default (first .Values.denoiser.groups).name -}}
{{- $found := "" -}}
{{- range .Values.denoiser.groups -}}{{- if eq .name $want -}}{{- $found = toJson . -}}{{- end -}}{{- end -}}
{{- if not $found -}}
{{- fail (printf "denoiser.autoscaleGroup %q names no group of denoiser.groups" $want) -}}
{{- end -}}
{{- $found -}}
{{- end -}}

{{/* `kind/name` of a stage's workload, as the gateway's --STAGE-workload takes it. */}}
{{- define "ditmesh.workloadRef" -}}
{{- $full := include "ditmesh.fullname" .root -}}
{{- if eq .stage "denoiser" -}}
{{- $g := include "ditmesh.autoscaleGroup" .root | fromJson -}}
{{- $kind := ternary "leaderworkerset" "statefulset" (gt (int (default 1 $g.nodes)) 1) -}}
{{- printf "%s/%s" $kind (include "ditmesh.denoiserName" (dict "root" .root "group" $g)) -}}
{{- else -}}
{{- printf "deployment/%s-%s" $full .stage -}}
{{- end -}}
{{- end -}}

{{/* Whether a stage runs on a GPU: the chart's gpu.enabled and the stage's count. */}}
{{- define "ditmesh.onGpu" -}}
{{- if and .root.Values.gpu.enabled (gt (int .gpus) 0) -}}true{{- end -}}
{{- end -}}

{{- define "ditmesh.image" -}}
{{- $kind := ternary "cuda" "cpu" (eq (include "ditmesh.onGpu" .) "true") -}}
{{- $base := index .root.Values.image $kind -}}
{{- $img := merge (deepCopy (.s.image | default dict)) $base -}}
{{- $repo := $img.repository -}}
{{- if .root.Values.image.registry -}}{{- $repo = printf "%s/%s" .root.Values.image.registry $repo -}}{{- end -}}
{{- printf "%s:%s" $repo ($img.tag | default .root.Chart.AppVersion) -}}
{{- end -}}

{{/* --model: the folder inside the model volume, or the hub id. */}}
{{- define "ditmesh.modelArg" -}}
{{- $m := .Values.model -}}
{{- if eq $m.source "hub" -}}
{{- required "model.hub.id is required when model.source is hub" $m.hub.id -}}
{{- else if eq $m.source "tiny" -}}
{{- printf "%s/tiny-%s" $m.mountPath $m.tiny.family -}}
{{- else -}}
{{- printf "%s/%s" $m.mountPath (required (printf "model.path is required when model.source is %s" $m.source) $m.path) -}}
{{- end -}}
{{- end -}}

{{- define "ditmesh.tlsDir" -}}/etc/ditmesh/tls{{- end -}}

{{/* The arguments every `ditmesh serve STAGE` takes from the chart. */}}
{{- define "ditmesh.serveArgs" -}}
- serve
- {{ .stage }}
- --model={{ include "ditmesh.modelArg" .root }}
{{- with .root.Values.model.name }}
- --name={{ . }}
{{- end }}
- --host=0.0.0.0
- --port={{ .root.Values.ports.grpc }}
- --metrics-port={{ .root.Values.ports.metrics }}
- --drain-seconds={{ .root.Values.drainSeconds }}
{{- if and (ne .stage "gateway") (ne (include "ditmesh.onGpu" .) "true") }}
- --device=cpu
{{- end }}
{{- if .root.Values.tls.enabled }}
- --tls-cert={{ include "ditmesh.tlsDir" . }}/tls.crt
- --tls-key={{ include "ditmesh.tlsDir" . }}/tls.key
- --tls-ca={{ include "ditmesh.tlsDir" . }}/ca.crt
{{- if eq .stage "gateway" }}
- --stage-tls-cert={{ include "ditmesh.tlsDir" . }}/tls.crt
- --stage-tls-key={{ include "ditmesh.tlsDir" . }}/tls.key
- --stage-tls-ca={{ include "ditmesh.tlsDir" . }}/ca.crt
- --stage-tls-server-name={{ include "ditmesh.tlsServerName" .root }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The name the mesh's certificate carries and every TLS client checks: the gateway
dials the stages' pod IPs (EndpointSlices), so one name stands for all of them. */}}
{{- define "ditmesh.tlsServerName" -}}
{{- .Values.tls.serverName | default (printf "%s-mesh" (include "ditmesh.fullname" .)) -}}
{{- end -}}

{{- define "ditmesh.env" -}}
- name: HOME
  value: /tmp
- name: PYTHONUNBUFFERED
  value: "1"
- name: XDG_CACHE_HOME
  value: /cache
- name: HF_HOME
  value: /cache/huggingface
- name: TORCHINDUCTOR_CACHE_DIR
  value: /cache/inductor
- name: TRITON_CACHE_DIR
  value: /cache/triton
- name: HF_HUB_OFFLINE
  value: {{ ternary "0" "1" (eq .root.Values.model.source "hub") | quote }}
{{- if and (eq .root.Values.model.source "hub") .root.Values.model.hub.tokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .root.Values.model.hub.tokenSecret }}
      key: {{ .root.Values.model.hub.tokenKey }}
{{- end }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: OTEL_SERVICE_NAME
  value: ditmesh-{{ .stage }}
{{- with .root.Values.telemetry.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- range $k, $v := .root.Values.telemetry.otelEnv }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- with .root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Resources with the GPUs added; a GPU count in `resources` that differs from the
one the degrees give is refused rather than silently overridden. */}}
{{- define "ditmesh.resources" -}}
{{- $res := deepCopy (.s.resources | default dict) -}}
{{- if eq (include "ditmesh.onGpu" .) "true" -}}
{{- $name := .root.Values.gpu.resourceName -}}
{{- range $part := list "requests" "limits" -}}
{{- $have := index ($res | default dict) $part | default dict -}}
{{- if and (hasKey $have $name) (ne (int (index $have $name)) (int $.gpus)) -}}
{{- fail (printf "%s: resources.%s[%s] is %v but the stage needs %d GPUs (the product of its parallel degrees)" $.stage $part $name (index $have $name) (int $.gpus)) -}}
{{- end -}}
{{- $_ := set $have $name (int $.gpus) -}}
{{- $_ := set $res $part $have -}}
{{- end -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{- define "ditmesh.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "ditmesh.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
{{- end -}}

{{/* A gRPC health check of the server on this pod: Kubernetes' own gRPC probe, or,
since that probe speaks no TLS, the same check run in the container with the pod's
certificate. */}}
{{- define "ditmesh.healthCheck" -}}
{{- if or .root.Values.tls.enabled .hostEnv }}
exec:
  command:
    - python
    - -c
    - |
      import grpc, os, sys
      from grpc_health.v1 import health_pb2, health_pb2_grpc
      target = "%s:{{ .root.Values.ports.grpc }}" % {{ if .hostEnv }}os.environ["{{ .hostEnv }}"]{{ else }}"127.0.0.1"{{ end }}
      {{- if .root.Values.tls.enabled }}
      d = "{{ include "ditmesh.tlsDir" . }}/"
      creds = grpc.ssl_channel_credentials(*(open(d + f, "rb").read() for f in ("ca.crt", "tls.key", "tls.crt")))
      ch = grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", "{{ include "ditmesh.tlsServerName" .root }}")])
      {{- else }}
      ch = grpc.insecure_channel(target)
      {{- end }}
      r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=4)
      sys.exit(r.status != health_pb2.HealthCheckResponse.SERVING)
{{- else }}
grpc:
  port: {{ .root.Values.ports.grpc }}
{{- end }}
{{- end -}}

{{/* Startup (long: a 12B model loads and compiles), readiness (NOT_SERVING while
draining, so the gateway stops sending work) and liveness. The kubelet stops liveness
probes once a pod is being deleted, so a draining server is not restarted. */}}
{{- define "ditmesh.probes" -}}
{{- $p := .root.Values.probes -}}
{{- $check := include "ditmesh.healthCheck" . | trim -}}
startupProbe:
  {{- $check | nindent 2 }}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: 5
  failureThreshold: {{ div (.startupSeconds | default $p.startupSeconds) $p.periodSeconds | max 1 }}
readinessProbe:
  {{- $check | nindent 2 }}
  periodSeconds: 5
  timeoutSeconds: 5
  failureThreshold: 2
livenessProbe:
  {{- $check | nindent 2 }}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: 5
  failureThreshold: {{ $p.livenessFailures }}
{{- end -}}

{{- define "ditmesh.lifecycle" -}}
preStop:
  sleep:
    seconds: {{ .Values.preStopSeconds }}
{{- end -}}

{{- define "ditmesh.terminationGrace" -}}
{{- add (int .Values.drainSeconds) (int .Values.preStopSeconds) 30 -}}
{{- end -}}

{{/* Writable places under a read-only root: /tmp, the caches, /dev/shm for gangs. */}}
{{- define "ditmesh.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /cache
{{- if ne .root.Values.model.source "hub" }}
- name: model
  mountPath: {{ .root.Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- if .shm }}
- name: shm
  mountPath: /dev/shm
{{- end }}
{{- if .root.Values.tls.enabled }}
- name: tls
  mountPath: {{ include "ditmesh.tlsDir" . }}
  readOnly: true
{{- end }}
{{- if and (eq .stage "gateway") .root.Values.gateway.apiKeysSecret }}
- name: api-keys
  mountPath: /etc/ditmesh/api-keys
  readOnly: true
{{- end }}
{{- end -}}

{{- define "ditmesh.volumes" -}}
{{- $v := .root.Values -}}
- name: tmp
  emptyDir: {}
- name: cache
  {{- if $v.hfCache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ $v.hfCache.existingClaim }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ $v.hfCache.sizeLimit }}
  {{- end }}
{{- if eq $v.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required when model.source is pvc" $v.model.pvc.claimName }}
    readOnly: true
{{- else if eq $v.model.source "hostPath" }}
- name: model
  hostPath:
    path: {{ required "model.hostPath.path is required when model.source is hostPath" $v.model.hostPath.path }}
    type: Directory
{{- else if eq $v.model.source "tiny" }}
- name: model
  emptyDir:
    sizeLimit: 1Gi
{{- end }}
{{- if .shm }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shm }}
{{- end }}
{{- if $v.tls.enabled }}
- name: tls
  secret:
    secretName: {{ required "tls.secretName is required when tls.enabled" $v.tls.secretName }}
{{- end }}
{{- if and (eq .stage "gateway") $v.gateway.apiKeysSecret }}
- name: api-keys
  secret:
    secretName: {{ $v.gateway.apiKeysSecret }}
{{- end }}
{{- end -}}

{{/* model.source tiny: write the model before the server starts (same seed, same
weights in every pod, so every stage fingerprints the same components). */}}
{{- define "ditmesh.initContainers" -}}
{{- if eq .root.Values.model.source "tiny" }}
initContainers:
  - name: make-tiny
    image: {{ include "ditmesh.image" . }}
    imagePullPolicy: {{ .root.Values.image.pullPolicy }}
    command: [ditmesh]
    args:
      - make-tiny
      - {{ .root.Values.model.tiny.family }}
      - {{ include "ditmesh.modelArg" .root }}
      - --seed={{ .root.Values.model.tiny.seed }}
    env:
      {{- include "ditmesh.env" . | nindent 6 }}
    securityContext:
      {{- include "ditmesh.containerSecurityContext" . | nindent 6 }}
    resources:
      requests: {cpu: 500m, memory: 1Gi}
      limits: {memory: 2Gi}
    volumeMounts:
      - name: tmp
        mountPath: /tmp
      - name: cache
        mountPath: /cache
      - name: model
        mountPath: {{ .root.Values.model.mountPath }}
{{- end }}
{{- end -}}

{{/* Scheduling keys of a stage's pods. */}}
{{- define "ditmesh.scheduling" -}}
{{- with .s.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .s.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .s.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .s.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .root.Values.image.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end -}}

{{- define "ditmesh.ports" -}}
- name: grpc
  containerPort: {{ .Values.ports.grpc }}
  protocol: TCP
- name: metrics
  containerPort: {{ .Values.ports.metrics }}
  protocol: TCP
{{- end -}}

{{/* A stage's pod template: .root, .stage, .s (its values), .gpus, .shm (size or ""),
.args (arguments after the shared ones), and optionally .command, .labels, .hostEnv (the variable naming the host
whose health the probes check, for a gang's worker pods), .ports (extra container ports),
.serviceAccount. */}}
{{- define "ditmesh.podTemplate" -}}
metadata:
  labels:
    {{- include "ditmesh.labels" . | nindent 4 }}
    {{- with .labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .s.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- if .serviceAccount }}
  serviceAccountName: {{ .serviceAccount }}
  automountServiceAccountToken: true
  {{- else }}
  automountServiceAccountToken: false
  {{- end }}
  securityContext:
    {{- include "ditmesh.podSecurityContext" .root | nindent 4 }}
  terminationGracePeriodSeconds: {{ include "ditmesh.terminationGrace" .root }}
  {{- with include "ditmesh.scheduling" . | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  {{- with include "ditmesh.initContainers" . | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  containers:
    - name: {{ .stage }}
      image: {{ include "ditmesh.image" . }}
      imagePullPolicy: {{ .root.Values.image.pullPolicy }}
      command: {{ .command | default (list "ditmesh") | toJson }}
      args:
        {{- include "ditmesh.serveArgs" . | nindent 8 }}
        {{- with .args }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with .s.extraArgs }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      env:
        {{- include "ditmesh.env" . | nindent 8 }}
      ports:
        {{- include "ditmesh.ports" .root | nindent 8 }}
        {{- with .ports }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- include "ditmesh.probes" . | nindent 6 }}
      lifecycle:
        {{- include "ditmesh.lifecycle" .root | nindent 8 }}
      resources:
        {{- include "ditmesh.resources" . | nindent 8 }}
      securityContext:
        {{- include "ditmesh.containerSecurityContext" . | nindent 8 }}
      volumeMounts:
        {{- include "ditmesh.volumeMounts" . | nindent 8 }}
  volumes:
    {{- include "ditmesh.volumes" . | nindent 4 }}
{{- end -}}

{{/* A stage's Service: gRPC and metrics ports, selecting its serving pods. */}}
{{- define "ditmesh.service" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "ditmesh.fullname" .root }}-{{ .stage }}
  labels:
    {{- include "ditmesh.labels" . | nindent 4 }}
  {{- with .annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ .type | default "ClusterIP" }}
  selector:
    {{- include "ditmesh.selectorLabels" . | nindent 4 }}
    ditmesh.io/role: server
  ports:
    - name: grpc
      port: {{ .root.Values.ports.grpc }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    - name: metrics
      port: {{ .root.Values.ports.metrics }}
      targetPort: metrics
      protocol: TCP
    {{- with .ports }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* Replicas of a workload: the values' count, except that a workload an autoscaler
owns keeps its live count across `helm upgrade` (lookup finds nothing in `helm template`). */}}
{{- define "ditmesh.replicas" -}}
{{- $scaled := or (eq .root.Values.gateway.autoscale.mode "on") .root.Values.keda.enabled -}}
{{- $live := dict -}}
{{- if $scaled -}}
{{- $live = lookup .apiVersion .kind .root.Release.Namespace .name | default dict -}}
{{- end -}}
{{- if and $scaled $live.spec -}}
{{- $live.spec.replicas -}}
{{- else -}}
{{- .replicas -}}
{{- end -}}
{{- end -}}

{{/* The encoder's or the VAE's Deployment and Service (ctx as for podTemplate). */}}
{{- define "ditmesh.stageDeployment" -}}
{{- $name := printf "%s-%s" (include "ditmesh.fullname" .root) .stage -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  labels:
    {{- include "ditmesh.labels" . | nindent 4 }}
spec:
  replicas: {{ include "ditmesh.replicas" (dict "root" .root "apiVersion" "apps/v1" "kind" "Deployment" "name" $name "replicas" .s.replicas) }}
  selector:
    matchLabels:
      {{- include "ditmesh.selectorLabels" . | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      # GPUs are scarce: replace a pod in place rather than wait for a spare GPU.
      maxSurge: {{ ternary 0 1 (eq (include "ditmesh.onGpu" .) "true") }}
      maxUnavailable: 1
  template:
    {{- include "ditmesh.podTemplate" . | nindent 4 }}
---
{{ include "ditmesh.service" . }}
{{- end -}}

{{/* The gang's degrees as `ditmesh serve denoiser` flags (a YAML list). */}}
{{- define "ditmesh.gangArgs" -}}
{{- $p := .parallel | default dict -}}
{{- range $d := list "dp" "cfg" "pipefusion" "ulysses" "ring" }}
- --{{ $d }}={{ int (default 1 (index $p $d)) }}
{{- end }}
{{- with $p.patches }}
- --patches={{ int . }}
{{- end }}
{{- end -}}
