{{/* Names. */}}
{{- define "causeway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "causeway.fullname" -}}
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

{{- define "causeway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "causeway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "causeway.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The store nodes' StatefulSet and its headless Service share this name. */}}
{{- define "causeway.store.fullname" -}}{{ include "causeway.fullname" . }}-store{{- end -}}
{{- define "causeway.configManager.fullname" -}}{{ include "causeway.fullname" . }}-config-manager{{- end -}}
{{- define "causeway.api.fullname" -}}{{ include "causeway.fullname" . }}-api{{- end -}}
{{- define "causeway.cdc.fullname" -}}{{ include "causeway.fullname" . }}-cdc{{- end -}}
{{- define "causeway.auth.secretName" -}}
{{- default (printf "%s-tokens" (include "causeway.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "causeway.internalAuth.secretName" -}}
{{- default (printf "%s-cluster" (include "causeway.fullname" .)) .Values.internalAuth.existingSecret -}}
{{- end -}}

{{/* Store nodes: the shape plus the spares. */}}
{{- define "causeway.store.count" -}}
{{- add (mul .Values.cluster.partitions .Values.cluster.replicas) .Values.cluster.spareNodes -}}
{{- end -}}

{{/* The config manager's address, host:port. */}}
{{- define "causeway.configManager.address" -}}
{{ include "causeway.configManager.fullname" . }}.{{ .Release.Namespace }}.svc:{{ .Values.configManager.port }}
{{- end -}}

{{/* Labels: common ones, then a component's (pass dict "root" $ "component" "store"). */}}
{{- define "causeway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "causeway.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "causeway.labels" -}}
{{ include "causeway.selectorLabels" . }}
helm.sh/chart: {{ include "causeway.chart" .root }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: causeway
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* metadata.annotations of every object: the common ones (pass the root). */}}
{{- define "causeway.annotations" -}}
{{- with .Values.commonAnnotations -}}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end -}}
{{- end -}}

{{- define "causeway.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ $tag }}
{{- end -}}
{{- end -}}

{{/* A Kubernetes quantity (512Mi, 4Gi, 1G, 1000) as bytes. */}}
{{- define "causeway.bytes" -}}
{{- $q := toString . -}}
{{- $units := dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 -}}
{{- $bytes := 0 -}}
{{- $matched := false -}}
{{- range $suffix, $factor := $units -}}
{{- if and (not $matched) (hasSuffix $suffix $q) -}}
{{- $bytes = mul (trimSuffix $suffix $q | int64) $factor -}}
{{- $matched = true -}}
{{- end -}}
{{- end -}}
{{- if not $matched -}}
{{- $bytes = $q | int64 -}}
{{- end -}}
{{- $bytes -}}
{{- end -}}

{{/* The transaction log's options as JSON, for --log. The SASL credentials are the env
     variables of causeway.kafka.env, expanded by the kubelet. */}}
{{- define "causeway.log" -}}
{{- $k := .Values.kafka -}}
{{- $props := dict -}}
{{- if and $k.tls.enabled $k.sasl.enabled -}}
{{- $_ := set $props "security.protocol" "SASL_SSL" -}}
{{- else if $k.tls.enabled -}}
{{- $_ := set $props "security.protocol" "SSL" -}}
{{- else if $k.sasl.enabled -}}
{{- $_ := set $props "security.protocol" "SASL_PLAINTEXT" -}}
{{- end -}}
{{- if $k.tls.enabled -}}
{{- $_ := set $props "ssl.ca.location" "/etc/causeway/kafka-tls/ca.crt" -}}
{{- if $k.tls.clientCertificate -}}
{{- $_ := set $props "ssl.certificate.location" "/etc/causeway/kafka-tls/tls.crt" -}}
{{- $_ := set $props "ssl.key.location" "/etc/causeway/kafka-tls/tls.key" -}}
{{- end -}}
{{- end -}}
{{- if $k.sasl.enabled -}}
{{- $_ := set $props "sasl.mechanism" $k.sasl.mechanism -}}
{{- $_ := set $props "sasl.username" "$(KAFKA_SASL_USERNAME)" -}}
{{- $_ := set $props "sasl.password" "$(KAFKA_SASL_PASSWORD)" -}}
{{- end -}}
{{- $log := dict "backend" "kafka" "bootstrap_servers" (required "kafka.bootstrapServers is required" $k.bootstrapServers) "topic" $k.topic "create_topic" $k.createTopic "replication_factor" $k.replicationFactor "min_insync_replicas" $k.minInsyncReplicas "topic_config" $k.topicConfig "properties" (mergeOverwrite (dict) $props $k.properties) -}}
{{- toJson $log -}}
{{- end -}}

{{/* Env of every container that reaches Kafka or runs Causeway. */}}
{{- define "causeway.env" -}}
{{- if .Values.kafka.sasl.enabled }}
- name: KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ required "kafka.sasl.existingSecret is required with SASL" .Values.kafka.sasl.existingSecret }}
      key: {{ .Values.kafka.sasl.usernameKey }}
- name: KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.existingSecret }}
      key: {{ .Values.kafka.sasl.passwordKey }}
{{- end }}
- name: CAUSEWAY_LOG
  value: {{ include "causeway.log" . | quote }}
- name: CAUSEWAY_CONFIG_MANAGER
  value: {{ include "causeway.configManager.address" . | quote }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "causeway.kafka.volumes" -}}
{{- if .Values.kafka.tls.enabled }}
- name: kafka-tls
  secret:
    secretName: {{ required "kafka.tls.existingSecret is required with TLS" .Values.kafka.tls.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "causeway.kafka.volumeMounts" -}}
{{- if .Values.kafka.tls.enabled }}
- name: kafka-tls
  mountPath: /etc/causeway/kafka-tls
  readOnly: true
{{- end }}
{{- end -}}

{{/* The pod-level settings every Causeway pod shares (pass dict "root" $ "c" <component values>). */}}
{{- define "causeway.podCommon" -}}
serviceAccountName: {{ include "causeway.serviceAccountName" .root }}
automountServiceAccountToken: {{ .root.Values.serviceAccount.automountServiceAccountToken }}
enableServiceLinks: false
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .root.Values.image.pullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.initContainers }}
initContainers:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod template metadata (pass dict "root" $ "c" <component values> "component" "store"). */}}
{{- define "causeway.podMetadata" -}}
labels:
  {{- include "causeway.labels" . | nindent 2 }}
  {{- with .c.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- $annotations := merge (dict) (.c.podAnnotations | default dict) (.root.Values.commonAnnotations | default dict) }}
{{- if and .metricsPort .root.Values.metrics.podAnnotations }}
{{- $_ := set $annotations "prometheus.io/scrape" "true" }}
{{- $_ := set $annotations "prometheus.io/port" (toString .metricsPort) }}
{{- $_ := set $annotations "prometheus.io/path" "/metrics" }}
{{- end }}
{{- with .checksum }}
{{- $_ := set $annotations "checksum/config" . }}
{{- end }}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Hard or soft anti-affinity on kubernetes.io/hostname (pass dict "root" $ "component" "store" "mode" "soft"). */}}
{{- define "causeway.antiAffinity" -}}
{{- if eq .mode "hard" }}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels:
          {{- include "causeway.selectorLabels" . | nindent 10 }}
{{- else if eq .mode "soft" }}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "causeway.selectorLabels" . | nindent 12 }}
{{- end }}
{{- end -}}

{{/* The internal links' credentials (causeway_proto::link): a component's `security` options
     as JSON. Pass dict "root" $ "role" <role> "admin" <bool>: role is config-manager,
     store-node, api-server, cdc or admin (the hook Jobs); admin adds the admin token. The files
     are those of causeway.security.volumeMounts: /etc/causeway/cluster/{cluster-secret,
     admin-token} and, with internalTLS.enabled, /etc/causeway/internal-tls/{ca.crt, tls.crt,
     tls.key}. The cluster secret is set with TLS too, where it is ignored. */}}
{{- define "causeway.security" -}}
{{- $s := dict "cluster_secret_file" "/etc/causeway/cluster/cluster-secret" -}}
{{- if .admin -}}
{{- $_ := set $s "admin_token_file" "/etc/causeway/cluster/admin-token" -}}
{{- end -}}
{{- if .root.Values.internalTLS.enabled -}}
{{- $_ := set $s "tls" (dict "ca" "/etc/causeway/internal-tls/ca.crt" "cert" "/etc/causeway/internal-tls/tls.crt" "key" "/etc/causeway/internal-tls/tls.key") -}}
{{- end -}}
{{- toJson $s -}}
{{- end -}}

{{/* The volumes of causeway.security's files (same dict). */}}
{{- define "causeway.security.volumes" -}}
{{- $v := .root.Values -}}
- name: cluster-secret
  secret:
    secretName: {{ include "causeway.internalAuth.secretName" .root }}
    defaultMode: 0440
    items:
      - key: {{ $v.internalAuth.clusterSecretKey }}
        path: cluster-secret
      {{- if .admin }}
      - key: {{ $v.internalAuth.adminTokenKey }}
        path: admin-token
      {{- end }}
{{- if $v.internalTLS.enabled }}
- name: internal-tls
  secret:
    secretName: {{ required "internalTLS.existingSecret is required with internalTLS.enabled" $v.internalTLS.existingSecret }}
    defaultMode: 0440
    {{- if ne .role "store-node" }}
    items:
      - key: ca.crt
        path: ca.crt
      - key: {{ .role }}.crt
        path: tls.crt
      - key: {{ .role }}.key
        path: tls.key
    {{- end }}
{{- end }}
{{- end -}}

{{/* The mounts of causeway.security.volumes (same dict). A store pod mounts the files of its
     own id, store-node-<ordinal>.crt and .key, by the pod's index label (env POD_INDEX). */}}
{{- define "causeway.security.volumeMounts" -}}
- name: cluster-secret
  mountPath: /etc/causeway/cluster
  readOnly: true
{{- if .root.Values.internalTLS.enabled }}
{{- if eq .role "store-node" }}
- name: internal-tls
  mountPath: /etc/causeway/internal-tls/ca.crt
  subPath: ca.crt
  readOnly: true
- name: internal-tls
  mountPath: /etc/causeway/internal-tls/tls.crt
  subPathExpr: store-node-$(POD_INDEX).crt
  readOnly: true
- name: internal-tls
  mountPath: /etc/causeway/internal-tls/tls.key
  subPathExpr: store-node-$(POD_INDEX).key
  readOnly: true
{{- else }}
- name: internal-tls
  mountPath: /etc/causeway/internal-tls
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{/* The env of an admin command (the hook Jobs): the files of causeway.security, for the flags
     of `causeway admin` (same dict). */}}
{{- define "causeway.security.env" -}}
{{- $s := include "causeway.security" . | fromJson -}}
- name: CAUSEWAY_CLUSTER_SECRET_FILE
  value: {{ $s.cluster_secret_file }}
{{- with $s.admin_token_file }}
- name: CAUSEWAY_ADMIN_TOKEN_FILE
  value: {{ . }}
{{- end }}
{{- with $s.tls }}
- name: CAUSEWAY_TLS_CA
  value: {{ .ca }}
- name: CAUSEWAY_TLS_CERT
  value: {{ .cert }}
- name: CAUSEWAY_TLS_KEY
  value: {{ .key }}
{{- end }}
{{- end -}}
