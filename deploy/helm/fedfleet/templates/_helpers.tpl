{{- define "fedfleet.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fedfleet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fedfleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "fedfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "fedfleet.selector" -}}
app.kubernetes.io/name: {{ include "fedfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fedfleet.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "fedfleet.secretName" -}}
{{- .Values.tokens.existingSecret | default (printf "%s-tokens" (include "fedfleet.fullname" .)) -}}
{{- end -}}

{{- define "fedfleet.scheme" -}}
{{- if .Values.tls.enabled -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{- define "fedfleet.coordinatorUrl" -}}
{{ include "fedfleet.scheme" . }}://{{ include "fedfleet.fullname" . }}-coordinator:{{ .Values.coordinator.port }}
{{- end -}}

{{- /*
The volume source of a site's data (or the coordinator's test data), always read-only: exactly one of
existingClaim, hostPath or volume. Called with (list WHAT SPEC); WHAT names the entry in messages.
*/ -}}
{{- define "fedfleet.dataVolume" -}}
{{- $what := index . 0 -}}
{{- $spec := index . 1 -}}
{{- $given := list -}}
{{- range $key := list "existingClaim" "hostPath" "volume" -}}
{{- if get $spec $key }}{{ $given = append $given $key }}{{ end -}}
{{- end -}}
{{- if ne (len $given) 1 -}}
{{- fail (printf "%s: give exactly one of existingClaim, hostPath or volume (got %s)" $what (join ", " $given | default "none")) -}}
{{- end -}}
{{- if $spec.existingClaim -}}
persistentVolumeClaim:
  claimName: {{ $spec.existingClaim }}
  readOnly: true
{{- else if $spec.hostPath -}}
hostPath:
  path: {{ $spec.hostPath }}
  type: Directory
{{- else -}}
{{ toYaml $spec.volume }}
{{- end -}}
{{- end -}}

{{- /*
The worker StatefulSets to render: the partition workers, or one per entry of .Values.sites (each a
dict of name and site). Site names are checked here, once, for both the StatefulSets and the coordinator.
*/ -}}
{{- define "fedfleet.workerSets" -}}
{{- $sets := list -}}
{{- if .Values.sites -}}
{{- if .Values.worker.hpa.enabled -}}
{{- fail "worker.hpa.enabled cannot be used with sites: each site is one worker with its own data" -}}
{{- end -}}
{{- $names := list -}}
{{- range $site := .Values.sites -}}
{{- $name := toString (required "every entry of sites needs a name" $site.name) -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,28}[a-z0-9])?$" $name) -}}
{{- fail (printf "sites: %q is not a DNS label of at most 30 characters (a-z, 0-9 and - inside)" $name) -}}
{{- end -}}
{{- if has $name $names -}}
{{- fail (printf "sites: %q is listed twice; each site is one worker" $name) -}}
{{- end -}}
{{- $names = append $names $name -}}
{{- $sets = append $sets (dict "name" (printf "site-%s" $name) "site" $site) -}}
{{- end -}}
{{- else -}}
{{- $sets = append $sets (dict "name" "worker" "site" dict) -}}
{{- end -}}
{{- toJson $sets -}}
{{- end -}}
