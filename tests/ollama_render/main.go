// Renders a conversation through an Ollama Modelfile TEMPLATE the way Ollama's server prepares it:
// Go's text/template over {System, Messages, Tools, Response}, with consecutive messages of one role
// joined by a blank line and the system messages also gathered into .System (as ollama/template does).
//
//	go run . < request.json      request: {"template": "...", "messages": [{"role": ..., "content": ...}]}
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type request struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

func gather(messages []Message) (string, []*Message) {
	var system []string
	var joined []*Message
	for i := range messages {
		m := messages[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(joined); n > 0 && joined[n-1].Role == m.Role {
			joined[n-1].Content += "\n\n" + m.Content
			continue
		}
		joined = append(joined, &m)
	}
	return strings.Join(system, "\n\n"), joined
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("").Parse(req.Template))
	system, messages := gather(req.Messages)
	data := map[string]any{"System": system, "Messages": messages, "Tools": nil, "Response": ""}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
