{{/* The release's base name, at most 40 characters so that suffixes fit in 63. */}}
{{- define "cellplane.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cellplane.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "control-plane"). */}}
{{- define "cellplane.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "cellplane.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "cellplane.controlPlane" -}}
{{ include "cellplane.fullname" . }}-control-plane
{{- end -}}

{{/* The headless Service giving each node a stable name. */}}
{{- define "cellplane.peers" -}}
{{ include "cellplane.controlPlane" . }}-peers
{{- end -}}

{{/* The control plane's addresses for agents, the operator and cellctl: each node by name. */}}
{{- define "cellplane.controlPlaneEndpoints" -}}
{{- if .Values.controlPlane.enabled -}}
{{- $names := list -}}
{{- range $i := until (int .Values.controlPlane.replicas) -}}
{{- $names = append $names (printf "%s-%d.%s.%s.svc.%s:%d" (include "cellplane.controlPlane" $) $i (include "cellplane.peers" $) $.Release.Namespace $.Values.clusterDomain (int $.Values.controlPlane.port)) -}}
{{- end -}}
{{- join "," $names -}}
{{- else -}}
{{- required "controlPlane.externalEndpoints must list the control plane when controlPlane.enabled is false" (join "," .Values.controlPlane.externalEndpoints) -}}
{{- end -}}
{{- end -}}

{{- define "cellplane.agent" -}}
{{ include "cellplane.fullname" .root }}-agent-{{ .region }}
{{- end -}}

{{/* Where a cell is reached: its region's agent Service and the cell's port. */}}
{{- define "cellplane.cellEndpoint" -}}
{{ include "cellplane.agent" (dict "root" .root "region" .region) }}.{{ .root.Release.Namespace }}.svc.{{ .root.Values.clusterDomain }}:{{ .port }}
{{- end -}}

{{/* The TLS files every component reads, from its mounted Secret. */}}
{{- define "cellplane.tlsToml" -}}
[tls]
ca = "/etc/cellplane/tls/ca.crt"
cert = "/etc/cellplane/tls/tls.crt"
key = "/etc/cellplane/tls/tls.key"
{{- end -}}

{{- define "cellplane.tlsVolume" -}}
- name: tls
  secret:
    secretName: {{ .secret }}
{{- end -}}

{{/* A TOML table of plain keys, from a map of values, or nothing when the map is empty:
(dict "name" "raft" "values" ...). */}}
{{- define "cellplane.tomlTable" -}}
{{- if .values -}}
[{{ .name }}]
{{- range $key, $value := .values }}
{{ $key }} = {{ $value | toJson }}
{{- end }}
{{- end -}}
{{- end -}}

{{/* The role lists of an [auth]-like table, or nothing: (dict "name" "auth" "values" ...). */}}
{{- define "cellplane.authToml" -}}
{{- $roles := dict -}}
{{- range $role, $names := .values -}}
{{- if and (ne $role "regions") $names -}}
{{- $_ := set $roles $role $names -}}
{{- end -}}
{{- end -}}
{{- if $roles -}}
[{{ .name }}]
{{- range $role, $names := $roles }}
{{ $role }} = {{ $names | toJson }}
{{- end }}
{{- with .values.regions }}
[{{ $.name }}.regions]
{{- range $identity, $region := . }}
{{ $identity | quote }} = {{ $region | quote }}
{{- end }}
{{- end }}
{{- end -}}
{{- end -}}

{{- define "cellplane.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "cellplane.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{- define "cellplane.operatorLease" -}}
{{ include "cellplane.fullname" . }}-operator
{{- end -}}
