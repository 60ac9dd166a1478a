{{/* Names and labels shared by every object of the release. */}}
{{- define "clustermesh.labels" -}}
app.kubernetes.io/name: clustermesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
clustermesh.io/cluster: {{ .Values.cluster.name | quote }}
{{- end -}}

{{- define "clustermesh.image" -}}
{{ printf "%s:%s" .repository .tag }}
{{- end -}}

{{/* The contexts file `clustermesh etcd init` reads: root of the cluster's own etcd, in the apiserver's pod. */}}
{{- define "clustermesh.rootContext" -}}
contexts:
  {{ .Values.cluster.name }}:
    endpoints: ["https://127.0.0.1:{{ .Values.apiserver.etcdPort }}"]
    ca: /etc/clustermesh/root/ca.crt
    cert: /etc/clustermesh/root/tls.crt
    key: /etc/clustermesh/root/tls.key
current-context: {{ .Values.cluster.name }}
{{- end -}}
