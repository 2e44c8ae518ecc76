{{/* Chart name, overridable. */}}
{{- define "imageunlock.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, with the chart name unless the release already has it. */}}
{{- define "imageunlock.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "imageunlock.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "imageunlock.labels" -}}
helm.sh/chart: {{ include "imageunlock.chart" . }}
{{ include "imageunlock.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: imageunlock
{{- end }}

{{/* Name prefix of the two roles' objects: the release's full name without the chart's
"-operator" suffix, so the default release "imageunlock-operator" names them
imageunlock-agent and imageunlock-controller, as manifests/ does. Short enough for the
longest suffix ("-controller-metrics") to keep a Service name within 63 characters. */}}
{{- define "imageunlock.prefix" -}}
{{- include "imageunlock.fullname" . | trimSuffix "-operator" | trunc 44 | trimSuffix "-" }}
{{- end }}

{{- define "imageunlock.agentName" -}}
{{- printf "%s-agent" (include "imageunlock.prefix" .) }}
{{- end }}

{{- define "imageunlock.controllerName" -}}
{{- printf "%s-controller" (include "imageunlock.prefix" .) }}
{{- end }}

{{/* Selector labels: stable across upgrades (a workload's selector is immutable). Each
object adds app.kubernetes.io/component: agent or controller. */}}
{{- define "imageunlock.selectorLabels" -}}
app.kubernetes.io/name: {{ include "imageunlock.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* ServiceAccount names: the roles' names unless set; with serviceAccount.create=false
they must name existing ones. */}}
{{- define "imageunlock.agentServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "imageunlock.agentName" .) .Values.serviceAccount.agentName }}
{{- else }}
{{- required "serviceAccount.agentName is required when serviceAccount.create is false" .Values.serviceAccount.agentName }}
{{- end }}
{{- end }}

{{- define "imageunlock.controllerServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "imageunlock.controllerName" .) .Values.serviceAccount.controllerName }}
{{- else }}
{{- required "serviceAccount.controllerName is required when serviceAccount.create is false" .Values.serviceAccount.controllerName }}
{{- end }}
{{- end }}

{{/* The pod securityContext both roles share; the agent adds its supplementalGroups. */}}
{{- define "imageunlock.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .Values.runAsUser }}
runAsGroup: {{ .Values.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The container securityContext both roles share (Pod Security "restricted"). */}}
{{- define "imageunlock.containerSecurity" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* kopf's liveness endpoint as the liveness and readiness probes of both roles. */}}
{{- define "imageunlock.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: health
  initialDelaySeconds: 10
  periodSeconds: 20
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /healthz
    port: health
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
{{- end }}

{{- define "imageunlock.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if hasPrefix "sha256:" $tag }}
{{- printf "%s@%s" .Values.image.repository $tag }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The pod template metadata of one role, called with (list . "agent") or (list .
"controller"): the chart's labels, which the selectors and NetworkPolicies use, over the
role's podLabels over the top-level podLabels; the role's podAnnotations over the top-level
ones. */}}
{{- define "imageunlock.podMetadata" -}}
{{- $root := index . 0 }}
{{- $role := index . 1 }}
{{- $values := index $root.Values $role }}
{{- $labels := include "imageunlock.labels" $root | fromYaml }}
{{- $_ := set $labels "app.kubernetes.io/component" $role }}
{{- $labels = merge $labels (deepCopy (default dict $values.podLabels)) (deepCopy (default dict $root.Values.podLabels)) }}
labels:
  {{- toYaml $labels | nindent 2 }}
{{- with merge (deepCopy (default dict $values.podAnnotations)) (deepCopy (default dict $root.Values.podAnnotations)) }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* A workload's update strategy from a role's updateStrategy value: rollingUpdate only
with type RollingUpdate (Helm merges the default's rollingUpdate into a value that sets
type OnDelete or Recreate, which the API server would refuse). */}}
{{- define "imageunlock.updateStrategy" -}}
type: {{ .type }}
{{- if and (eq .type "RollingUpdate") .rollingUpdate }}
rollingUpdate:
  {{- toYaml .rollingUpdate | nindent 2 }}
{{- end }}
{{- end }}
